"""The disk toolkit: GPT, planner, mover, verity, grub.cfg, ext tools."""
