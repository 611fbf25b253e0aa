"""Training stages on Ray Train: dSFT (``sft.py``) and dDPO (``dpo.py``) with TRL under DeepSpeed (``loop.py``)."""
