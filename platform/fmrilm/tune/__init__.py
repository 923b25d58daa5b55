"""Ray Tune sweeps over stage specs."""
