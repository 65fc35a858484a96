"""Converting model images to 8-bit pixels and saving PNG grids (Pillow)."""

import io
import math

import numpy as np
from PIL import Image

from diffusion_jax import storage


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats -> uint8 in [0, 255], rounding as the DDPM reference code does."""
  x = np.asarray(images, np.float32)
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images, *, nrow: int | None = None, padding: int = 1, pad_value: int = 255) -> np.ndarray:
  """Tiles uint8 images [N, H, W, C] into one [rows*H', cols*W', C] array."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    images = to_uint8(images)
  n, h, w, c = images.shape
  ncol = nrow or max(1, int(math.ceil(math.sqrt(n))))
  nrows = int(math.ceil(n / ncol))
  grid = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value,
                 np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, ncol)
    y, x = padding + r * (h + padding), padding + col * (w + padding)
    grid[y:y + h, x:x + w] = img
  return grid


def save_grid(images, path, *, nrow: int | None = None, scale: int | None = None):
  """Saves images ([-1, 1] floats or uint8, NHWC) as a PNG grid; small images are upscaled.

  ``path`` is a string or ``epath.Path`` (local or ``gs://...``), written through
  epath under a temporary name, then renamed (:func:`storage.write_file`); its
  folder is created if needed. Returns ``path`` as given.
  """
  grid = make_grid(images, nrow=nrow)
  if scale is None:
    scale = max(1, 512 // max(grid.shape[0], 1))
  img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
  if scale > 1:
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  png = io.BytesIO()
  img.save(png, format='PNG')
  storage.write_file(path, png.getvalue())
  return path


IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp')


def read_images(path, image_size: int, num_channels: int, field: str = 'input') -> np.ndarray:
  """Your own images as uint8 ``[N, image_size, image_size, num_channels]``.

  ``path`` is a folder of images (sorted by name; each converted to grey or RGB
  and resized with bicubic resampling when its size differs) or an ``.npz``
  file whose ``images`` are uint8 NHWC of that shape. ValueError / FileNotFoundError
  name ``field`` and the problem.
  """
  from etils import epath  # pylint: disable=g-import-not-at-top
  p = epath.Path(path)
  shape = (image_size, image_size, num_channels)
  if not p.exists():
    raise FileNotFoundError(f'{field} {str(path)!r} does not exist; pass a folder of images or an '
                            ".npz file with 'images'.")
  if p.is_dir():
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
      raise ValueError(f'{field} {str(path)!r} holds no images ({", ".join(IMAGE_SUFFIXES)}).')
    out = []
    for f in files:
      with f.open('rb') as fh, Image.open(fh) as pil:
        pil = pil.convert('L' if num_channels == 1 else 'RGB')
        if pil.size != (image_size, image_size):
          pil = pil.resize((image_size, image_size), Image.BICUBIC)
        out.append(np.asarray(pil, np.uint8).reshape(shape))
    return np.stack(out)
  try:
    with p.open('rb') as fh:
      images = np.load(io.BytesIO(fh.read()))['images']
  except (KeyError, ValueError, OSError) as e:
    raise ValueError(f"{field} {str(path)!r} is not an .npz file with 'images' ({e}).") from e
  if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != shape:
    raise ValueError(f"{field} {str(path)!r}: 'images' must be uint8 [N, {', '.join(map(str, shape))}]; "
                     f'got {images.dtype} {list(images.shape)}.')
  return images
