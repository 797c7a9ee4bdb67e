"""Reading and writing images as people have them.

`read_image` gives a float32 HxWxC array in [0, 1] with C = 1 (gray), 2 (gray + alpha), 3 (RGB) or
4 (RGBA), plus an `ImageInfo` that `write_image` uses to write the result back alike:
- EXIF orientation is applied (the pixels are turned, the tag is not carried);
- palette images become RGB, or RGBA when they have transparency (a tRNS colour in L/RGB images
  becomes an alpha channel too); bilevel becomes gray; CMYK is converted to RGB through its ICC
  profile when it has one (the output then carries sRGB), else with Pillow's plain formula;
- 16-bit PNGs stay 16-bit: gray through Pillow's 'I;16'; RGB, RGBA and gray + alpha, which Pillow
  only reads as 8-bit, by decoding the file twice with Pillow's own PNG decoder, once for the high
  and once for the low byte of each sample (`_read_png16`), and written by a small PNG encoder here
  (`_write_png16`), since Pillow has no 16-bit colour modes. Other 16-bit colour files (TIFF) are
  read at 8 bits, as Pillow gives them;
- the ICC profile is carried into the output, the print resolution into PNG and JPEG, a PNG's
  gamma and text chunks into PNG (`CARRIED_PNG_CHUNKS`);
- only the first frame of animations is read.
`write_image` writes PNG, WebP or JPEG atomically: a temporary file in the same folder, renamed
over the target only when complete. JPEG cannot store alpha: such images are refused (see
`composite`). WebP has no gray mode: Pillow stores gray as RGB.
"""

import contextlib
import dataclasses
import io
import os
import secrets
import stat
import struct
import zlib

import numpy as np
from PIL import Image, ImageCms, ImageColor, ImageOps, PngImagePlugin

FORMATS = {'png': 'PNG', 'webp': 'WEBP', 'jpeg': 'JPEG'}
SUFFIXES = {'png': '.png', 'webp': '.webp', 'jpeg': '.jpg'}
# The largest side each format can store (WebP's 14-bit sizes, JPEG's 16-bit; PNG's 2^31 - 1).
MAX_SIDES = {'png': 2 ** 31 - 1, 'webp': 16383, 'jpeg': 65535}
SUFFIX_FORMATS = {'.png': 'png', '.webp': 'webp', '.jpg': 'jpeg', '.jpeg': 'jpeg'}
DEFAULT_QUALITY = 90
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
_PNG16_COLOUR_TYPES = {2: 'RGB;16', 4: 'LA;16', 6: 'RGBA;16'}  # 16-bit ones Pillow reads as 8-bit
_MODES_16 = ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I')
_CHANNEL_MODES = {1: 'L', 2: 'LA', 3: 'RGB', 4: 'RGBA'}
_TIFF_BITS_PER_SAMPLE, _TIFF_X_RESOLUTION, _TIFF_PLANAR_CONFIGURATION = 258, 282, 284
# A PNG's chunks that still hold for the upscaled pixels: the colour encoding (gamma, primaries,
# sRGB intent) and the text (titles, comments, a generator's parameters); carried into PNG output.
CARRIED_PNG_CHUNKS = (b'gAMA', b'cHRM', b'sRGB', b'tEXt', b'zTXt', b'iTXt')


class ImageError(Exception):
  """A file that cannot be read or written; the message is one line naming it and the reason."""


@dataclasses.dataclass(frozen=True)
class ImageInfo:
  """What the file was, so that the output can be written alike."""
  mode: str  # the file's mode as Pillow opened it ('RGB', 'P', 'I;16', 'CMYK', 'RGB;16', ...)
  channels: int  # of the array read_image returns: 1, 2, 3 or 4
  bit_depth: int = 8  # 8 or 16
  icc_profile: bytes | None = None
  format: str | None = None  # Pillow's name of the source format ('PNG', 'JPEG', ...)
  frames: int = 1  # an animation's or a multi-page file's frames (the first is the image read)
  dpi: tuple | None = None  # (x, y) print resolution, kept on PNG and JPEG output
  png_chunks: tuple = ()  # ((type, data), ...) of CARRIED_PNG_CHUNKS, kept on PNG output

  @property
  def has_alpha(self):
    return self.channels in (2, 4)


def first_line(e):
  """An exception's message in one line (its type's name where it has none)."""
  return str(e).splitlines()[0] if str(e) else type(e).__name__


def _reason(e):
  if isinstance(e, OSError) and e.strerror:
    return e.strerror
  return first_line(e)


def output_format(path, format=None):
  """'png' | 'webp' | 'jpeg': `format` (jpg allowed), else from the path's suffix."""
  if format:
    fmt = {'jpg': 'jpeg'}.get(format.lower(), format.lower())
    if fmt not in FORMATS:
      raise ImageError(f'{path}: unknown output format {format!r} (png, webp or jpeg)')
    return fmt
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in SUFFIX_FORMATS:
    raise ImageError(f'{path}: cannot tell the output format from {suffix or "no suffix"!r} '
                     '(use .png, .webp, .jpg or a format option)')
  return SUFFIX_FORMATS[suffix]


def output_dtype(info, format):
  """The integer dtype an output of `format` gets: 16 bits only for 16-bit sources to PNG."""
  return np.uint16 if format == 'png' and info is not None and info.bit_depth == 16 else np.uint8


# Reading.

def _png_ihdr(path):
  """(bit depth, colour type) of a PNG, from its header."""
  with open(path, 'rb') as f:
    head = f.read(26)
  if len(head) < 26 or head[:8] != PNG_SIGNATURE or head[12:16] != b'IHDR':
    raise ImageError(f'{path}: cannot read: broken PNG header')
  return head[24], head[25]


@contextlib.contextmanager
def open_image(path):
  """Pillow's image of `path`, opened through a file object: given a path, Pillow memory-maps
  some uncompressed files (L, RGBA, 16-bit, CMYK TIFFs...) at the size it reports, which for a
  TIFF turned a quarter (EXIF orientation 5-8) is the turned one, and scrambled them."""
  with open(path, 'rb') as f, Image.open(f) as im:
    _fix_planar_tiff16(im)
    yield im


def _fix_planar_tiff16(im):
  """Pillow reads an uncompressed 16-bit TIFF with separate colour planes with 8-bit unpackers
  ('R', 'G', 'B': two pixels of garbage per sample); these take each sample's high byte, as
  Pillow does for interleaved 16-bit RGB."""
  if (im.format != 'TIFF' or im.tag_v2.get(_TIFF_PLANAR_CONFIGURATION) != 2
      or set(im.tag_v2.get(_TIFF_BITS_PER_SAMPLE, ())) != {16}):
    return
  order = ';16L' if im.tag_v2._endian == '<' else ';16B'  # pylint: disable=protected-access
  im.tile = [t._replace(args=(t.args[0] + order,) + tuple(t.args[1:]))
             if t.codec_name == 'raw' and t.args[0] in ('R', 'G', 'B', 'A') else t for t in im.tile]


def _decode(path, rawmode=None):
  """The first frame, oriented; with `rawmode`, Pillow's PNG decoder unpacks into another layout
  of the same bits per pixel (so its row filters are undone the same way)."""
  with open_image(path) as im:
    if rawmode is not None:
      im.tile = [t._replace(args=rawmode) for t in im.tile]
    im.load()
    return ImageOps.exif_transpose(im), im.info


def _read_png16(path, colour_type):
  """16-bit RGB, RGBA or gray + alpha PNG -> (uint16 HxWxC, Pillow info)."""
  if colour_type == 4:  # gray + alpha: 4 bytes a pixel, unpacked as if RGBA: L hi, L lo, A hi, A lo
    im, info = _decode(path, 'RGBA')
    b = np.asarray(im).astype(np.uint16)
    return np.stack([b[..., 0] << 8 | b[..., 1], b[..., 2] << 8 | b[..., 3]], -1), info
  raw = 'RGB' if colour_type == 2 else 'RGBA'
  hi, info = _decode(path)  # Pillow keeps the high bytes (';16B')
  lo, _ = _decode(path, f'{raw};16L')  # the little-endian unpacker picks the other byte
  data = np.asarray(hi).astype(np.uint16) << 8
  data |= np.asarray(lo)
  return data, info


def _cmyk_to_rgb(im):
  """(RGB image, ICC profile of the result): through the file's profile when it has one."""
  icc = im.info.get('icc_profile')
  if icc:
    try:
      srgb = ImageCms.createProfile('sRGB')
      out = ImageCms.profileToProfile(im, ImageCms.ImageCmsProfile(io.BytesIO(icc)), srgb,
                                      outputMode='RGB')
      return out, ImageCms.ImageCmsProfile(srgb).tobytes()
    except (ImageCms.PyCMSError, OSError, ValueError):
      pass  # a broken profile: fall back to the plain conversion
  return im.convert('RGB'), None


def _to_float(data, maxval):
  out = np.array(data, np.float32)  # a copy: Pillow's float32 buffers are read-only
  out *= np.float32(1.0 / maxval)
  return out if out.ndim == 3 else out[..., None]


def integer_pixels(im, full_scale=None):
  """(values, white) of an integer-mode ('I', 'I;16*') Pillow image: 32-bit TIFF samples span
  their type's range (signed where SampleFormat says so) unless none passes 65535 (16-bit data in
  a 32-bit file, as cameras' counts are kept: read as 16-bit, not as black); other such images
  (16-bit PNG, PGM, which Pillow scales to 16 bits) 65535. `full_scale`: white as found before a
  transpose (which drops the TIFF tags)."""
  white = full_scale or integer_full_scale(im)
  values = np.asarray(im)
  if white == 2 ** 32 - 1:
    values = values.view(np.uint32)
  if white > 65535 and values.size and values.max() <= 65535:
    white = 65535
  return values, white


def integer_full_scale(im):
  """White of an integer-mode Pillow image (see integer_pixels)."""
  tags = getattr(im, 'tag_v2', None)
  if im.mode == 'I' and tags is not None and tuple(tags.get(258, ()))[:1] == (32,):
    return 2 ** 31 - 1 if tuple(tags.get(339, (1,)))[:1] == (2,) else 2 ** 32 - 1
  return 65535


def _has_transparency(im):
  """An alpha band, a tRNS colour or palette alphas (Pillow's has_transparency_data, which
  changed from a method to a property across versions)."""
  if im.mode in ('LA', 'La', 'PA', 'RGBA', 'RGBa') or 'transparency' in im.info:
    return True
  return im.mode == 'P' and im.palette is not None and im.palette.mode == 'RGBA'


def _read(path, im):
  fmt, mode = im.format, im.mode
  icc = im.info.get('icc_profile') or None
  if fmt == 'PNG':
    depth, colour_type = _png_ihdr(path)
    if depth == 16 and colour_type in _PNG16_COLOUR_TYPES:
      data, info = _read_png16(path, colour_type)
      trns = info.get('transparency')
      if colour_type == 2 and isinstance(trns, tuple):  # one transparent colour
        alpha = np.where((data == np.array(trns, np.uint16)).all(-1), 0, 65535).astype(np.uint16)
        data = np.concatenate([data, alpha[..., None]], -1)
      image = _to_float(data, 65535)
      return image, ImageInfo(_PNG16_COLOUR_TYPES[colour_type], image.shape[-1], 16, icc, fmt)
  im.load()  # decoding errors surface here
  white = integer_full_scale(im) if mode in _MODES_16 else 1
  im = ImageOps.exif_transpose(im)
  if mode in _MODES_16 or mode == 'F':
    raw, white = integer_pixels(im, white) if mode in _MODES_16 else (np.asarray(im), 1)
    # (NaN as 0: a float file's NaN pixels would blank what the model computes around them)
    image = np.clip(np.nan_to_num(_to_float(raw, white)), 0, 1)
    trns = im.info.get('transparency')
    if isinstance(trns, int) and mode != 'F':
      image = np.concatenate([image, (raw != trns).astype(np.float32)[..., None]], -1)
    return image, ImageInfo(mode, image.shape[-1], 16, icc, fmt)
  if mode == 'CMYK':
    im, icc = _cmyk_to_rgb(im)
  elif mode in ('1', 'L', 'LA', 'La'):
    im = im.convert('LA' if _has_transparency(im) else 'L')
  else:  # P, PA, RGB, RGBA, RGBa, RGBX, YCbCr, LAB, HSV
    im = im.convert('RGBA' if _has_transparency(im) else 'RGB')
  image = _to_float(im, 255)
  return image, ImageInfo(mode, image.shape[-1], 8, icc, fmt)


def _png_chunks(path, kinds=CARRIED_PNG_CHUNKS):
  """((type, data), ...) of a PNG's chunks of `kinds`, in order, read by seeking past the others
  (the image data); a damaged chunk list ends the search (Pillow reports what is broken)."""
  found = []
  with open(path, 'rb') as f:
    f.seek(len(PNG_SIGNATURE))
    while True:
      head = f.read(8)
      if len(head) < 8:
        break
      length, kind = struct.unpack('>I', head[:4])[0], head[4:]
      if kind == b'IEND' or length > 2 ** 31 - 1:
        break
      if kind in kinds:
        data = f.read(length)
        if len(data) < length:
          break
        if not _is_metadata_profile(kind, data):
          found.append((kind, data))
        f.seek(4, os.SEEK_CUR)  # the CRC
      else:
        f.seek(length + 4, os.SEEK_CUR)
  return tuple(found)


def _is_metadata_profile(kind, data):
  """A text chunk holding XMP or an EXIF profile (ImageMagick's 'Raw profile type ...'): not
  carried, as EXIF is not: its orientation, already applied, would turn the output again."""
  keyword = data.split(b'\0', 1)[0]
  return kind in (b'tEXt', b'zTXt', b'iTXt') and (
      keyword == b'XML:com.adobe.xmp' or keyword.startswith(b'Raw profile type'))


def _dpi_of(im, orientation):
  """The (x, y) print resolution of an opened image in its upright orientation, or None: a TIFF
  without resolution tags has none (Pillow reports 1 dpi for it)."""
  if im.format == 'TIFF' and _TIFF_X_RESOLUTION not in im.tag_v2:
    return None
  dpi = _dpi(im.info.get('dpi'))
  return dpi[::-1] if dpi and orientation in (5, 6, 7, 8) else dpi


def _dpi(value):
  """(x, y) dots per inch, rounded to 0.01 (PNG stores dots per metre), or None if unset or bad."""
  try:
    x, y = (round(float(v), 2) for v in value)
  except (TypeError, ValueError):
    return None
  return (x, y) if x > 0 and y > 0 else None


def walk_folder(root, onerror=None, skip=()):
  """(folder, sorted file names) for `root` and every subfolder, in sorted order; linked folders
  outside the tree are followed, each real folder once (a link loop ends there; a link into the
  tree is left to the folder's own name); hidden folders and the folders whose real path is in
  `skip` are left out. `onerror(OSError)` hears of folders that cannot be
  listed."""
  root_real = os.path.realpath(root)
  skipped = {os.path.realpath(s) for s in skip}
  visited = {root_real} | skipped

  def walked_by_its_own_name(real):
    """Whether the walk reaches folder `real` under its own name: inside the tree, not under
    a hidden or skipped folder."""
    if not (real + os.sep).startswith(root_real + os.sep):
      return False
    parts = os.path.relpath(real, root_real).split(os.sep)
    return not any(p.startswith('.') for p in parts if p != os.curdir) and not any(
        (real + os.sep).startswith(s + os.sep) for s in skipped)

  for folder, dirs, files in os.walk(root, onerror=onerror, followlinks=True):
    kept = []
    for d in sorted(dirs):
      path = os.path.join(folder, d)
      real = os.path.realpath(path)
      if os.path.islink(path) and walked_by_its_own_name(real):
        continue  # a link into the tree: its folder keeps its own name
      if not d.startswith('.') and real not in visited:
        visited.add(real)
        kept.append(d)
    dirs[:] = kept
    yield folder, sorted(files)


def list_files(root, suffixes, onerror=None, skip=()):
  """Paths of the files under `root` (walk_folder's folders, in its order) whose lower-case suffix
  is in `suffixes`; hidden files are left out (notes, thumbnail databases, our own temporary
  files)."""
  return [os.path.join(folder, name) for folder, names in walk_folder(root, onerror, skip)
          for name in names
          if not name.startswith('.') and os.path.splitext(name)[1].lower() in suffixes]


def _check_regular_file(path):
  """ImageError unless `path` is a regular file: a pipe or a device named like an image would
  block open() or read() for ever."""
  mode = os.stat(path).st_mode
  if not stat.S_ISREG(mode):
    raise ImageError(f'{path}: cannot read: ' + (
        'a folder' if stat.S_ISDIR(mode) else 'not a regular file (a pipe or a device)'))


def _tiff_cut_short(f, prefix):
  """Whether a TIFF's first image directory ends past the end of the file `f`: one cut short
  (libtiff writes it after the pixels), which Pillow does not identify, not a layout it cannot
  read."""
  order = {b'II': '<', b'MM': '>'}.get(prefix[:2])
  if order is None or len(prefix) < 16:
    return False
  version = struct.unpack(order + 'H', prefix[2:4])[0]
  if version == 42:
    offset, count, entry, tail = struct.unpack(order + 'I', prefix[4:8])[0], 'H', 12, 4
  elif version == 43:  # BigTIFF
    offset, count, entry, tail = struct.unpack(order + 'Q', prefix[8:16])[0], 'Q', 20, 8
  else:
    return False
  size = os.fstat(f.fileno()).st_size
  f.seek(offset)
  head = f.read(struct.calcsize(count))
  if len(head) < struct.calcsize(count):
    return True
  entries = struct.unpack(order + count, head)[0]
  return offset + len(head) + entries * entry + tail > size


def _unknown_file_reason(path):
  """Why Pillow knows no format for `path`: the reason of the format whose signature the file has
  (a bad chunk checksum, a cut file, a TIFF layout Pillow does not read), else not an image."""
  Image.init()
  with open(path, 'rb') as f:
    prefix = f.read(16)
    for fmt in Image.ID:
      factory, accept = Image.OPEN[fmt]
      try:  # (some read past a short prefix: DIB's raises struct.error, as Image.open allows)
        if accept is None or not accept(prefix):
          continue
      except Exception:  # pylint: disable=broad-except
        continue
      f.seek(0)
      try:
        factory(f, path).close()
      except Exception as e:  # pylint: disable=broad-except; its reason is the message
        if fmt == 'TIFF' and _tiff_cut_short(f, prefix):
          return 'the file is cut short (its TIFF image directory lies past its end)'
        if fmt == 'TIFF':
          return (f'a TIFF of a layout Pillow does not read ({_reason(e)}; it reads 1 to 4 '
                  'channels of 8 bits, one channel of 16 or 32 bits or float, RGB of 16 bits): '
                  'save it as 8- or 16-bit RGB(A)')
        return f'{fmt} file: {_reason(e)}'
      break
  return 'not an image file Pillow knows'


@contextlib.contextmanager
def _reading(path):
  """Errors raised while opening or decoding `path` as one-line ImageErrors naming it."""
  try:
    yield
  except ImageError:
    raise
  except Image.UnidentifiedImageError as e:
    raise ImageError(f'{path}: cannot read: {_unknown_file_reason(path)}') from e
  except (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error,
          Image.DecompressionBombError, MemoryError) as e:
    raise ImageError(f'{path}: cannot read: {_reason(e)}') from e


@contextlib.contextmanager
def pixel_limit(pixels):
  """Pillow's decompression-bomb limit set to `pixels` (None: off) inside the block."""
  previous = Image.MAX_IMAGE_PIXELS
  Image.MAX_IMAGE_PIXELS = pixels
  try:
    yield
  finally:
    Image.MAX_IMAGE_PIXELS = previous


def _orientation_from_header(im):
  """The EXIF orientation found without decoding: Pillow's PNG getexif() decodes the file whole
  to look past its pixels, so for a PNG only what comes before them counts (eXIf, an EXIF or XMP
  text chunk: Pillow's base getexif reads those from the header's info)."""
  if im.format != 'PNG':
    return im.getexif().get(0x0112)
  return Image.Image.getexif(im).get(0x0112)


def peek(path):
  """(width, height, channels, bit depth) from the file's header, nothing decoded: the most
  channels (1-4) and bits (8 or 16) that read_image's array and the output will have."""
  path = os.fspath(path)
  with _reading(path):
    _check_regular_file(path)
    with open_image(path) as im:
      width, height = im.size
      # turned a quarter by read_image (Pillow's TIFF reports the turned size itself)
      if im.format != 'TIFF' and _orientation_from_header(im) in (5, 6, 7, 8):
        width, height = height, width
      if im.mode in ('P', 'PA'):
        channels = 4 if _has_transparency(im) else 3
      else:
        channels = min(4, len(im.getbands()) + ('transparency' in im.info))
      deep = im.mode in _MODES_16 or im.mode == 'F' or (
          im.format == 'PNG' and _png_ihdr(path)[0] == 16)
      return width, height, channels, 16 if deep else 8


def read_image(path):
  """(float32 HxWxC in [0, 1], ImageInfo); ImageError with a one-line reason if unreadable."""
  path = os.fspath(path)
  with _reading(path):
    _check_regular_file(path)
    with open_image(path) as im:
      frames, dpi = getattr(im, 'n_frames', 1), _dpi_of(im, _orientation_from_header(im))
      chunks = _png_chunks(path) if im.format == 'PNG' else ()
      image, info = _read(path, im)
      return image, dataclasses.replace(info, frames=frames, dpi=dpi, png_chunks=chunks)


# Writing.

def to_uint(image, bits):
  """float [0, 1] or uint8/uint16 -> uint8 (bits=8) or uint16 (bits=16), rounding."""
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image if bits == 8 else image.astype(np.uint16) * np.uint16(257)
  if image.dtype == np.uint16:
    if bits == 16:
      return image
    return ((image.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
  dtype = np.uint8 if bits == 8 else np.uint16
  return np.rint(np.clip(image, 0, 1) * np.iinfo(dtype).max).astype(dtype)


def _chunk(f, kind, data):
  f.write(struct.pack('>I', len(data)) + kind + data
          + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff))


def _write_png16(f, data, icc=None, rows=64, dpi=None, chunks=()):
  """A 16-bit PNG of uint16 HxWxC (C = 1..4), compressed in strips of `rows` (bounded memory);
  `chunks`: more (type, data) to write before the image data."""
  h, w, c = data.shape
  colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
  f.write(PNG_SIGNATURE)
  _chunk(f, b'IHDR', struct.pack('>IIBBBBB', w, h, 16, colour_type, 0, 0, 0))
  if icc:
    _chunk(f, b'iCCP', b'icc\x00\x00' + zlib.compress(icc))
  if dpi:  # pixels per metre, unit 1 (metre)
    _chunk(f, b'pHYs', struct.pack('>IIB', *(round(d / 0.0254) for d in dpi), 1))
  for kind, chunk_data in chunks:
    _chunk(f, kind, chunk_data)
  bpp = 2 * c
  z = zlib.compressobj(6)
  pending = []
  for y in range(0, h, rows):
    raw = data[y:y + rows].astype('>u2').view(np.uint8).reshape(-1, w * bpp)
    filtered = np.empty((raw.shape[0], w * bpp + 1), np.uint8)
    filtered[:, 0] = 1  # the 'Sub' filter: each byte minus the one a pixel to its left
    filtered[:, 1:bpp + 1] = raw[:, :bpp]
    np.subtract(raw[:, bpp:], raw[:, :-bpp], out=filtered[:, bpp + 1:])
    pending.append(z.compress(filtered.tobytes()))
    if sum(map(len, pending)) > (1 << 20):
      _chunk(f, b'IDAT', b''.join(pending))
      pending = []
  pending.append(z.flush())
  _chunk(f, b'IDAT', b''.join(pending))
  _chunk(f, b'IEND', b'')


def atomic_write(path, save):
  """Calls save(file) on a new temporary file beside `path`, then renames it over `path`; the
  temporary file is removed on any failure, so `path` is never left partial."""
  path = os.fspath(path)
  directory, name = os.path.split(os.path.abspath(path))
  # A short name of its own: `name` plus a suffix could pass the file system's 255-byte limit
  # (80 CJK characters are 240 bytes in UTF-8).
  tmp = os.path.join(directory, f'.w2x-{os.getpid()}-{secrets.token_hex(4)}.tmp')
  try:
    # os.open, not mkstemp: the file gets the usual permissions (0666 less the umask), not 0600.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, 'wb') as f:
      save(f)
      f.flush()
      os.fsync(f.fileno())  # else a crash soon after the rename can leave `path` empty
    os.replace(tmp, path)
  except BaseException as e:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    if isinstance(e, (OSError, ValueError, struct.error, zlib.error)):
      raise ImageError(f'{path}: cannot write: {_reason(e)}') from e
    raise


def _icc_for(icc, colour_space):
  """`icc` if it describes `colour_space` ('RGB ' or 'GRAY', as ICC spells them), else None: a
  grayscale scan's Gray profile on a WebP (always RGB), or a Lab TIFF's profile on its RGB
  conversion, would make colour-managed viewers reject the file or shift its colours."""
  if not icc:
    return None
  try:
    space = ImageCms.ImageCmsProfile(io.BytesIO(icc)).profile.xcolor_space
  except (ImageCms.PyCMSError, OSError, ValueError):
    return None  # unreadable: not worth embedding
  return icc if space == colour_space else None


def write_image(path, image, info=None, format=None, quality=None):
  """Writes HxWxC (float in [0, 1], uint8 or uint16) as PNG, WebP or JPEG (`format`, else from
  the suffix), atomically. 16 bits when the array is uint16 (or float with info.bit_depth 16) and
  the format is PNG; the ICC profile of `info` is embedded where it describes the written colour
  space (RGB or gray), its print resolution (dpi) in PNG and JPEG, its PNG chunks (gamma, text) in
  PNG. Raises ImageError."""
  path = os.fspath(path)
  fmt = output_format(path, format)
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] not in _CHANNEL_MODES:
    raise ImageError(f'{path}: cannot write an array of shape {image.shape}')
  c = image.shape[-1]
  if fmt == 'jpeg' and c in (2, 4):
    raise ImageError(f'{path}: JPEG cannot store alpha; write png or webp, or composite the '
                     'image over a background colour')
  bits16 = fmt == 'png' and (image.dtype == np.uint16 or (
      image.dtype.kind == 'f' and info is not None and info.bit_depth == 16))
  data = to_uint(image, 16 if bits16 else 8)
  # WebP stores RGB only: Pillow converts gray to it.
  written_space = 'GRAY' if c in (1, 2) and fmt != 'webp' else 'RGB '
  icc = _icc_for(info.icc_profile if info is not None else None, written_space)
  dpi = info.dpi if info is not None else None
  chunks = info.png_chunks if info is not None and fmt == 'png' else ()
  if icc:  # the profile describes the colours: an sRGB chunk beside it would contradict it
    chunks = tuple(chunk for chunk in chunks if chunk[0] != b'sRGB')
  quality = DEFAULT_QUALITY if quality is None else int(quality)

  def save(f):
    if bits16 and c > 1:
      _write_png16(f, data, icc, dpi=dpi, chunks=chunks)
      return
    im = Image.fromarray(data[..., 0] if c == 1 else data)  # uint16 2-D is 'I;16'
    kwargs = {'icc_profile': icc} if icc else {}
    if dpi and fmt in ('png', 'jpeg'):  # (Pillow writes no resolution into WebP)
      kwargs['dpi'] = dpi
    if chunks:
      kwargs['pnginfo'] = PngImagePlugin.PngInfo()
      for kind, chunk_data in chunks:
        kwargs['pnginfo'].add(kind, chunk_data)
    if fmt == 'jpeg':
      # From 90 up, 4:4:4 chroma: subsampling would blur the detail the upscaling made.
      kwargs.update(quality=quality, subsampling=0 if quality >= 90 else 2)
    elif fmt == 'webp':
      kwargs.update(quality=quality, lossless=quality >= 100)
    im.save(f, FORMATS[fmt], **kwargs)

  atomic_write(path, save)
  return path


def parse_color(text):
  """'white', '#ff8800', 'rgb(1,2,3)' ... -> RGB floats in [0, 1] (Pillow's colour names)."""
  try:
    rgb = ImageColor.getrgb(text)[:3]
  except ValueError as e:
    raise ValueError(f'unknown colour {text!r}') from e
  return tuple(v / 255.0 for v in rgb)


def composited_channels(channels, background):
  """The channels of an image of `channels` after `composite` over `background`: alpha dropped;
  gray stays gray over a gray background and becomes RGB over a coloured one."""
  if channels not in (2, 4):
    return channels
  return 1 if channels == 2 and len(set(np.asarray(background, np.float32).tolist())) == 1 else 3


def composite(image, background):
  """Drops alpha: the image over an RGB `background` (floats); gray stays gray over a gray
  background, and becomes RGB over a coloured one (its luma had been used: red gave gray)."""
  image = np.asarray(image, np.float32)
  c = image.shape[-1]
  if c not in (2, 4):
    return image
  if c == 2 and composited_channels(c, background) == 3:
    image, c = np.concatenate([np.repeat(image[..., :1], 3, -1), image[..., 1:]], -1), 4
  alpha = image[..., -1:]
  bg = np.asarray(background, np.float32)
  if c == 2:
    bg = np.float32(bg @ np.array([0.299, 0.587, 0.114], np.float32))
  return image[..., :-1] * alpha + bg * (1.0 - alpha)
