"""tridigits: the bundled tri-modal demo dataset (loader, builder, probe)."""
