"""Training: continued pre-training (healing), SFT recipes and from-scratch models, on TRL and PEFT."""
