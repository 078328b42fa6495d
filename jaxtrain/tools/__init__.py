"""Every command beyond training: sweep, coord-check, cooldown, fit-schedule-law, bench,
dry-run, eval, generate, plot, inspection, data bench, export. Tools may import every
layer below them; the training core never imports a tool (docs/ARCHITECTURE.md)."""
