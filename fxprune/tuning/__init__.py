"""Layer 3 (beside ``rewrite``): adjusting a pruned model's weights with data — BatchNorm
statistics re-estimated (:mod:`.recalibrate`) and fine-tuning with distillation from the dense
model (:mod:`.finetune`). Nothing here times anything or reads an fx graph's structure."""

from fxprune.tuning.finetune import FinetuneConfig, FinetuneResult, finetune
from fxprune.tuning.recalibrate import Recalibration, recalibrate_norms

__all__ = ["FinetuneConfig", "FinetuneResult", "Recalibration", "finetune", "recalibrate_norms"]
