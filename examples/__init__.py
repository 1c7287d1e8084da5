"""The paper's reproduction and the usage examples (not part of the installed package; a package only so
that its tests have names of their own)."""
