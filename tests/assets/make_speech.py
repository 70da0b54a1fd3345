"""Regenerate the spoken-word test clips with espeak-ng (run once; the outputs are committed).

Two synthetic voices (a low male and a high female espeak-ng variant) each say two short phrases;
clips are resampled to 16 kHz mono 16-bit WAV and trimmed to keep the assets tiny.
Usage: python tests/assets/make_speech.py
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import soundfile as sf
import torch
import torchaudio.functional as AF

HERE = Path(__file__).resolve().parent
VOICES = {"voice_a": "en-us+m3", "voice_b": "en-us+f4"}
PHRASES = {"1": "seven green apples", "2": "the quiet river"}


def main() -> None:
    for voice_name, voice in VOICES.items():
        for key, phrase in PHRASES.items():
            with tempfile.TemporaryDirectory() as tmp:
                raw = Path(tmp) / "raw.wav"
                subprocess.run(["espeak-ng", "-v", voice, "-s", "170", "-w", str(raw), phrase], check=True)
                wav, rate = sf.read(raw, dtype="float32", always_2d=True)
            mono = torch.from_numpy(wav.mean(axis=1))
            mono = AF.resample(mono, rate, 16000)
            voiced = (mono.abs() > 0.01).nonzero()
            mono = mono[max(0, int(voiced[0]) - 800): int(voiced[-1]) + 800]  # trim silence, keep 50 ms
            sf.write(HERE / f"{voice_name}_{key}.wav", mono.numpy(), 16000, subtype="PCM_16")


if __name__ == "__main__":
    main()
