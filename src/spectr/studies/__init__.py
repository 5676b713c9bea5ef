"""Studies: commands that measure something and publish it under docs/."""
