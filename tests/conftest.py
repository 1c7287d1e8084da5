"""Hypothesis profiles: "ci" (the default: a fixed, derandomised set of examples, a few minutes in
all) and "long" (HYPOTHESIS_PROFILE=long: many more examples with fresh random seeds)."""
import os

from hypothesis import settings

settings.register_profile("ci", max_examples=500, derandomize=True, print_blob=True)
settings.register_profile("long", max_examples=5000, derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
