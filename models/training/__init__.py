"""Fine-tuning LoRA adapters (Trainer + peft + ``datasets``) and the demo data they train on."""
