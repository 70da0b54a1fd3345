"""Zoo cards: the "What transfers" section comes from the transfer benchmark for that model only; the data
section says what each input alone is worth."""

from __future__ import annotations

from recipes.verify import transfer_section, with_transfer_section

MEASURED = {"model": "easyvqa-early-concat",
            "per_rows": {"1000": {"scratch": 0.81, "zoo": 0.99, "gain": 0.18, "gain_min": 0.15, "gain_max": 0.2,
                                  "seeds": [0, 1, 2]},
                         "200": {"scratch": 0.7, "zoo": 0.99, "gain": 0.29, "gain_min": 0.28, "gain_max": 0.31,
                                 "seeds": [0, 1, 2]}}}
CARD = "# m\n\n## Data\n\nd\n\n## Training recipe\n\nr\n\n## Metrics\n\nx\n"


def test_the_section_lists_each_size_in_order_with_the_paired_gain() -> None:
    text = transfer_section("easyvqa-early-concat", "easyvqa", MEASURED)
    rows = [line for line in text.splitlines() if line.startswith("| 2") or line.startswith("| 1")]
    assert rows == ["| 200 | 0.700 | 0.990 | +0.290 (+0.280, +0.310) | 3 |",
                    "| 1,000 | 0.810 | 0.990 | +0.180 (+0.150, +0.200) | 3 |"]
    assert "--model.init_from easyvqa-early-concat" in text


def test_another_models_measurement_is_not_claimed() -> None:
    assert transfer_section("easyvqa-late-concat", "easyvqa", MEASURED) == ""
    assert with_transfer_section(CARD, "easyvqa-late-concat", "easyvqa", MEASURED) == CARD


def test_the_section_goes_before_the_recipe_and_is_replaced_not_repeated() -> None:
    once = with_transfer_section(CARD, "easyvqa-early-concat", "easyvqa", MEASURED)
    assert once.index("## Data") < once.index("## What transfers") < once.index("## Training recipe")
    again = with_transfer_section(once, "easyvqa-early-concat", "easyvqa", MEASURED)
    assert again == once and again.count("## What transfers") == 1


def test_the_data_section_says_when_one_input_carries_the_task() -> None:
    from recipes.verify import data_section

    near = {"test": {"fused": {"accuracy": 0.975}, "audio": {"accuracy": 0.963}, "image": {"accuracy": 0.593}}}
    text = data_section("tridigits", near)
    assert "audio alone carries most of the task (the other inputs add 1.2 points)" in text
    far = {"test": {"fused": {"accuracy": 0.99}, "audio": {"accuracy": 0.85}, "image": {"accuracy": 0.80}}}
    assert "the model needs all its inputs" in data_section("tridigits", far)
