"""Sources of drafts behind one small interface (`Drafter`): a draft model, n-gram lookups."""

from spectr.drafters.base import Drafter
from spectr.drafters.model import ModelDrafter
from spectr.drafters.ngram import NgramDrafter

__all__ = ["Drafter", "ModelDrafter", "NgramDrafter"]
