"""What a group is (:mod:`.groups`) and how groups are shrunk, zeroed and frozen (:mod:`.penalty`)."""
from .groups import KINDS, NORM_KINDS, covered_modules, group_norms, nonzero_groups
from .penalty import GroupLasso, Masks, resolve_spec

__all__ = ["KINDS", "NORM_KINDS", "covered_modules", "group_norms", "nonzero_groups", "GroupLasso", "Masks",
           "resolve_spec"]
