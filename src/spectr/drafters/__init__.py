"""Sources of drafts behind one small interface (`Drafter`): a draft model, an EAGLE-style head over
the target's features, n-gram lookups."""

from spectr.drafters.base import Drafter
from spectr.drafters.eagle import EagleDrafter
from spectr.drafters.model import ModelDrafter
from spectr.drafters.ngram import NgramDrafter

__all__ = ["Drafter", "EagleDrafter", "ModelDrafter", "NgramDrafter"]
