"""The name -> factory registry shared by encoders and heads."""

from __future__ import annotations

import pytest

from fusion_common import Registry
from fusion_errors import RegistryError


def test_register_create_list_and_pattern() -> None:
    reg: Registry[int] = Registry("thing")

    @reg.register("one-a")
    def one(x: int = 1) -> int:
        return x

    reg.register("two-b")(lambda: 2)
    assert reg.list() == ["one-a", "two-b"]
    assert reg.list("*-b") == ["two-b"]
    assert reg.create("one-a", x=5) == 5
    assert "one-a" in reg


def test_duplicate_name_is_an_error() -> None:
    reg: Registry[int] = Registry("thing")
    reg.register("x")(lambda: 1)
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("x")(lambda: 2)


def test_unknown_name_suggests_close_names() -> None:
    reg: Registry[int] = Registry("fusion head")
    reg.register("gating")(lambda: 1)
    with pytest.raises(RegistryError, match="Did you mean 'gating'") as info:
        reg.create("gatting")
    assert "unknown fusion head 'gatting'" in str(info.value)
