"""The per-channel mean and std that published weights expect their inputs normalised with (RGB, 0..1)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's and most timm models'
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip.OPENAI_DATASET_MEAN / _STD, without the import
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)  # inputs scaled to -1..1 (SigLIP, TF EfficientNetV2)
