"""The comparison engine every command uses: seeded or user inputs, per-layer and whole-model checks, reports."""
