"""Training drafts for a target: self-distillation on text available offline."""
