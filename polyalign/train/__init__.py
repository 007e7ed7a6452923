"""Training: MLC (plug-in for SFT/DPO/SimPO/ORPO) and MSD (self-distillation) on HF/TRL trainers."""
