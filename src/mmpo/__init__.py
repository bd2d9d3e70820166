"""mmpo: offline preference optimization by maximum marginal likelihood (MMPO), with DPO and SimPO."""

from mmpo.objectives import ObjectiveOutput, dpo_loss, mmpo_loss, simpo_loss

__version__ = "0.1.0"
__all__ = ["ObjectiveOutput", "mmpo_loss", "dpo_loss", "simpo_loss", "__version__"]
