"""What a group is (:mod:`.groups`), how groups are shrunk and zeroed (:mod:`.penalty`) and frozen (:mod:`.masks`)."""
from .groups import KINDS, NORM_KINDS, covered_modules, group_norms, nonzero_groups
from .masks import Masks
from .penalty import GroupLasso, resolve_spec

__all__ = ["KINDS", "NORM_KINDS", "covered_modules", "group_norms", "nonzero_groups", "GroupLasso", "Masks",
           "resolve_spec"]
