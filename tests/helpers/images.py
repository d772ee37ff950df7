"""(PIL image, label) datasets of assorted sizes and modes, shared by the image-cache,
task-split, evaluation and AdaMerging tests."""
import numpy as np
from PIL import Image
from torch.utils.data import Dataset

# (width, height, mode): wide, tall, square, tiny, odd sizes; the modes PaperSplit converts
SHAPES = [(300, 200, "RGB"), (200, 300, "L"), (640, 480, "RGBA"), (31, 57, "P"), (224, 224, "RGB"),
          (225, 224, "L"), (64, 64, "RGB"), (500, 333, "P")]


def pil_images(shapes=SHAPES, seed=0):
    """Random images of the given sizes and modes (smooth enough that resizing matters)."""
    rng = np.random.default_rng(seed)
    out = []
    for w, h, mode in shapes:
        coarse = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 4), dtype=np.uint8)
        image = Image.fromarray(coarse, "RGBA").resize((w, h), Image.BILINEAR)
        out.append(image if mode == "RGBA" else image.convert(mode))
    return out


class Items(Dataset):
    """(PIL image, label i % 3) items, as load_paper_dataset gives without a transform; item
    ``fail_at`` raises, as an unreadable file does."""

    def __init__(self, images, fail_at=None):
        self.images, self.fail_at = images, fail_at

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise OSError(f"image {i} is unreadable")
        return self.images[i], i % 3
