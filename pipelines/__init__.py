"""Ray Data and Ray Train stages for Video2LoRA. The model library (`video2lora`) never imports Ray."""
