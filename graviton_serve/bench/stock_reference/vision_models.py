"""Model files for TorchServe's stock ``image_classifier`` handler: one nn.Module class per
file, built with no arguments, into which the handler loads our archive's state dict."""

RESNET50 = '''from torchvision.models.resnet import Bottleneck, ResNet


class ResNet50(ResNet):
    def __init__(self):
        super().__init__(Bottleneck, [3, 4, 6, 3])
'''

DENSENET161 = '''from torchvision.models.densenet import DenseNet


class DenseNet161(DenseNet):
    def __init__(self):
        super().__init__(growth_rate=48, block_config=(6, 12, 36, 24), num_init_features=96)
'''

# timm builds EfficientNet from a block definition, not constructor defaults: the class returns
# timm's model (the same keys as our archive's state dict). The stock handler's preprocessing is
# its own fixed ImageNet one (mean/std differ from this model's): a speed reference only.
EFFICIENTNET_LITE0 = '''import timm
from timm.models.efficientnet import EfficientNet


class EfficientNetLite0(EfficientNet):
    def __new__(cls):
        return timm.create_model("tf_efficientnet_lite0", pretrained=False)
'''

MODEL_FILES = {"resnet50": RESNET50, "densenet161": DENSENET161, "efficientnet_lite0": EFFICIENTNET_LITE0}
