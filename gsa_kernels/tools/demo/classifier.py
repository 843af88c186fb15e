"""A small MNIST classifier whose penultimate layer (128 ReLU features) is the feature space of
the demo's Frechet distance (an "FID" for MNIST; the real FID uses Inception-v3 pool features)."""
from torch import nn

CLASSIFIER_FILE = "mnist_classifier.safetensors"
FEATURE_DIM = 128


class Classifier(nn.Module):
    """x [B, 1, 28, 28] or [B, 784] in [-1, 1] -> logits [B, 10]; .features(x) -> [B, 128]."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 14x14
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 7x7
            nn.Flatten(), nn.Linear(32 * 7 * 7, FEATURE_DIM), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(FEATURE_DIM, 10))

    def features(self, x):
        return self.body(x.reshape(x.shape[0], 1, 28, 28).float())

    def forward(self, x):
        return self.head(self.features(x))


def load_classifier(path=None) -> Classifier:
    """The committed classifier (gsa_kernels/assets/mnist_classifier.safetensors), in eval mode."""
    from safetensors.torch import load_file

    from .data import ASSETS_DIR

    clf = Classifier()
    clf.load_state_dict(load_file(str(path or ASSETS_DIR / CLASSIFIER_FILE)))
    return clf.eval().requires_grad_(False)
