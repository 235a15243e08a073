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

MODEL_FILES = {"resnet50": RESNET50, "densenet161": DENSENET161}
