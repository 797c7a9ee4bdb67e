"""image_io: a round trip for each image mode (mode, size, alpha, ICC, EXIF, 16 bits), atomic
writes, clear errors."""

import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps, PngImagePlugin

from w2x_jax import data
from w2x_jax import image_io

SRGB_ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile('sRGB')).tobytes()


def _rng(seed=0):
  return np.random.default_rng(seed)


def _png16(path, data, colour_type):
  """An independent 16-bit PNG writer (filter 'None' on every row) for ground truth."""
  h, w = data.shape[:2]
  raw = data.astype('>u2').reshape(h, -1).view(np.uint8)
  body = np.concatenate([np.zeros((h, 1), np.uint8), raw], 1).tobytes()

  def chunk(kind, d):
    return struct.pack('>I', len(d)) + kind + d + struct.pack('>I', zlib.crc32(kind + d))
  with open(path, 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 16, colour_type,
                                                              0, 0, 0))
            + chunk(b'IDAT', zlib.compress(body)) + chunk(b'IEND', b''))


@pytest.mark.parametrize('mode', ['RGB', 'RGBA', 'L', 'LA'])
def test_8bit_round_trip_keeps_mode_size_alpha_icc(tmp_path, mode):
  channels = len(mode)
  data = _rng().integers(0, 256, (5, 7, channels), dtype=np.uint8)
  src = tmp_path / 'in.png'
  Image.fromarray(data[..., 0] if channels == 1 else data).save(src, icc_profile=SRGB_ICC)
  image, info = image_io.read_image(src)
  assert image.dtype == np.float32 and image.shape == (5, 7, channels)
  assert info == image_io.ImageInfo(mode, channels, 8, SRGB_ICC, 'PNG')
  assert info.has_alpha == (channels in (2, 4))
  np.testing.assert_array_equal(image_io.to_uint(image, 8), data)
  out = tmp_path / 'out.png'
  image_io.write_image(out, image, info)
  with Image.open(out) as im:
    # An RGB profile describes no gray image (PNG forbids it there): dropped, not copied.
    icc = SRGB_ICC if channels in (3, 4) else None
    assert (im.mode, im.size, im.info.get('icc_profile')) == (mode, (7, 5), icc)
    np.testing.assert_array_equal(np.asarray(im).reshape(5, 7, channels), data)


def test_palette_with_and_without_transparency(tmp_path):
  data = _rng().integers(0, 4, (6, 5), dtype=np.uint8)
  im = Image.fromarray(data, 'P')
  im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30])
  im.save(tmp_path / 'opaque.png')
  im.save(tmp_path / 'trns.png', transparency=2)
  image, info = image_io.read_image(tmp_path / 'opaque.png')
  assert (info.mode, info.channels, image.shape) == ('P', 3, (6, 5, 3))
  np.testing.assert_array_equal(image_io.to_uint(image[data == 3], 8),
                                [[10, 20, 30]] * (data == 3).sum())
  image, info = image_io.read_image(tmp_path / 'trns.png')
  assert (info.mode, info.channels, info.has_alpha) == ('P', 4, True)
  np.testing.assert_array_equal(image[..., 3], (data != 2).astype(np.float32))
  image_io.write_image(tmp_path / 'out.png', image, info)
  with Image.open(tmp_path / 'out.png') as out:
    assert out.mode == 'RGBA'
    np.testing.assert_array_equal(np.asarray(out)[..., 3], np.where(data == 2, 0, 255))


def test_gray_and_rgb_with_trns_colour_get_alpha(tmp_path):
  gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
  Image.fromarray(gray).save(tmp_path / 'l.png', transparency=40)
  image, info = image_io.read_image(tmp_path / 'l.png')
  assert info.channels == 2
  np.testing.assert_array_equal(image[..., 1], (gray != 40).astype(np.float32))


def test_bilevel_becomes_gray(tmp_path):
  Image.fromarray(np.eye(4, dtype=bool)).save(tmp_path / 'b.png')
  image, info = image_io.read_image(tmp_path / 'b.png')
  assert (info.mode, info.channels) == ('1', 1)
  np.testing.assert_array_equal(image[..., 0], np.eye(4))


def test_16bit_gray_round_trip(tmp_path):
  data = _rng().integers(0, 65536, (4, 6), dtype=np.uint16)
  Image.fromarray(data).save(tmp_path / 'g16.png')
  image, info = image_io.read_image(tmp_path / 'g16.png')
  assert (info.bit_depth, info.channels) == (16, 1)
  np.testing.assert_array_equal(image_io.to_uint(image, 16)[..., 0], data)
  image_io.write_image(tmp_path / 'out.png', image, info)
  with Image.open(tmp_path / 'out.png') as im:
    assert im.mode == 'I;16'
    np.testing.assert_array_equal(np.asarray(im), data)
  # To a format without 16 bits: rounded to 8.
  image_io.write_image(tmp_path / 'out.webp', image, info, quality=100)
  with Image.open(tmp_path / 'out.webp') as im:
    np.testing.assert_array_equal(np.asarray(im)[..., 0], image_io.to_uint(data, 8))


@pytest.mark.parametrize('colour_type,channels', [(2, 3), (6, 4), (4, 2)])
def test_16bit_colour_round_trip(tmp_path, colour_type, channels):
  data = _rng(colour_type).integers(0, 65536, (5, 9, channels), dtype=np.uint16)
  _png16(tmp_path / 'in.png', data, colour_type)
  image, info = image_io.read_image(tmp_path / 'in.png')
  assert (info.bit_depth, info.channels) == (16, channels)
  np.testing.assert_array_equal(image_io.to_uint(image, 16), data)  # the low bytes too
  out = tmp_path / 'out.png'
  image_io.write_image(out, image, image_io.ImageInfo(info.mode, channels, 16, SRGB_ICC, 'PNG'))
  back, back_info = image_io.read_image(out)
  # (an RGB profile on gray + alpha is dropped: PNG allows only a Gray one there)
  assert back_info.bit_depth == 16 and back_info.icc_profile == (SRGB_ICC if channels > 2 else None)
  np.testing.assert_array_equal(image_io.to_uint(back, 16), data)
  with Image.open(out) as im:  # Pillow (8 bits) reads our file too: the high bytes
    assert im.size == (9, 5)
    if channels != 2:
      np.testing.assert_array_equal(np.asarray(im), data >> 8)


def test_16bit_rgb_trns_colour(tmp_path):
  data = _rng().integers(0, 65536, (3, 4, 3), dtype=np.uint16)
  data[1, 2] = (1, 2, 3)
  _png16(tmp_path / 'in.png', data, 2)
  # Pillow cannot write 16-bit RGB: splice a tRNS chunk (one transparent colour) in by hand.
  raw = (tmp_path / 'in.png').read_bytes()
  at = raw.index(b'IDAT') - 4
  d = struct.pack('>HHH', 1, 2, 3)
  trns = struct.pack('>I', 6) + b'tRNS' + d + struct.pack('>I', zlib.crc32(b'tRNS' + d))
  (tmp_path / 'in.png').write_bytes(raw[:at] + trns + raw[at:])
  image, info = image_io.read_image(tmp_path / 'in.png')
  assert info.channels == 4
  want = np.ones((3, 4), np.float32)
  want[1, 2] = 0
  np.testing.assert_array_equal(image[..., 3], want)


@pytest.mark.parametrize('orientation', range(1, 9))
def test_exif_orientation_applied(tmp_path, orientation):
  data = _rng().integers(0, 256, (3, 5, 3), dtype=np.uint8)
  exif = Image.Exif()
  exif[0x0112] = orientation
  Image.fromarray(data).save(tmp_path / 'o.png', exif=exif)
  image, _ = image_io.read_image(tmp_path / 'o.png')
  with Image.open(tmp_path / 'o.png') as im:
    want = np.asarray(ImageOps.exif_transpose(im))
  assert image.shape[:2] == ((5, 3) if orientation >= 5 else (3, 5))
  np.testing.assert_array_equal(image_io.to_uint(image, 8), want)


def test_exif_orientation_16bit_colour(tmp_path):
  data = _rng().integers(0, 65536, (3, 5, 3), dtype=np.uint16)
  _png16(tmp_path / 'in.png', data, 2)
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 270 (clockwise 90) to view
  raw = (tmp_path / 'in.png').read_bytes()
  at = raw.index(b'IEND') - 4
  d = exif.tobytes()
  chunk = struct.pack('>I', len(d)) + b'eXIf' + d + struct.pack('>I', zlib.crc32(b'eXIf' + d))
  (tmp_path / 'in.png').write_bytes(raw[:at] + chunk + raw[at:])
  image, info = image_io.read_image(tmp_path / 'in.png')
  assert info.bit_depth == 16
  np.testing.assert_array_equal(image_io.to_uint(image, 16), np.rot90(data, -1))


def test_cmyk_converted(tmp_path):
  cmyk = _rng().integers(0, 256, (4, 6, 4), dtype=np.uint8)
  Image.fromarray(cmyk, 'CMYK').save(tmp_path / 'c.tif')
  image, info = image_io.read_image(tmp_path / 'c.tif')
  assert (info.mode, info.channels, image.shape) == ('CMYK', 3, (4, 6, 3))
  with Image.open(tmp_path / 'c.tif') as im:
    np.testing.assert_array_equal(image_io.to_uint(image, 8), np.asarray(im.convert('RGB')))


def test_jpeg_icc_and_alpha_refused(tmp_path):
  image = _rng().random((8, 8, 4), dtype=np.float32)
  info = image_io.ImageInfo('RGBA', 4, 8, SRGB_ICC, 'PNG')
  with pytest.raises(image_io.ImageError, match='JPEG cannot store alpha'):
    image_io.write_image(tmp_path / 'a.jpg', image, info)
  assert os.listdir(tmp_path) == []
  flat = image_io.composite(image, image_io.parse_color('white'))
  np.testing.assert_allclose(flat, image[..., :3] * image[..., 3:] + (1 - image[..., 3:]))
  image_io.write_image(tmp_path / 'a.jpg', flat, info, quality=95)
  with Image.open(tmp_path / 'a.jpg') as im:
    assert (im.format, im.mode, im.info.get('icc_profile')) == ('JPEG', 'RGB', SRGB_ICC)
  gray = image_io.composite(image[..., 2:], (1.0, 1.0, 1.0))
  assert gray.shape == (8, 8, 1)


def _gray_icc():
  """A minimal ICC v2 Gray profile (a grayscale scan's): a D50 white point and a gamma-1 curve."""
  def s15(v):
    return struct.pack('>i', round(v * 65536))
  white = s15(0.9642) + s15(1.0) + s15(0.8249)
  tags = [(b'wtpt', b'XYZ ' + bytes(4) + white), (b'kTRC', b'curv' + bytes(8))]
  offset = 128 + 4 + 12 * len(tags)
  table, body = struct.pack('>I', len(tags)), b''
  for sig, data in tags:
    table += sig + struct.pack('>II', offset + len(body), len(data))
    body += data + bytes(-len(data) % 4)
  header = (struct.pack('>I', offset + len(body)) + bytes(4) + struct.pack('>I', 0x02100000)
            + b'mntrGRAYXYZ ' + bytes(12) + b'acsp' + bytes(24) + white)
  return header + bytes(128 - len(header)) + table + body


def test_icc_profile_kept_only_for_its_colour_space(tmp_path):
  gray_icc = _gray_icc()
  assert ImageCms.ImageCmsProfile(io.BytesIO(gray_icc)).profile.xcolor_space == 'GRAY'
  gray = np.zeros((4, 5, 1), np.float32)
  lab_icc = ImageCms.ImageCmsProfile(ImageCms.createProfile('LAB')).tobytes()
  for name, image, icc, kept in [
      ('gray.png', gray, gray_icc, True),
      ('gray.jpg', gray, gray_icc, True),
      ('gray.webp', gray, gray_icc, False),  # WebP stores RGB: a Gray profile would not fit it
      ('rgb.png', np.zeros((4, 5, 3)), gray_icc, False),
      ('lab.png', np.zeros((4, 5, 3)), lab_icc, False),  # a Lab TIFF's profile on its RGB
      ('bad.png', np.zeros((4, 5, 3)), b'not a profile', False)]:
    image_io.write_image(tmp_path / name, image, image_io.ImageInfo('L', 1, 8, icc))
    with Image.open(tmp_path / name) as im:
      assert im.info.get('icc_profile') == (icc if kept else None), name


def test_float_image_read(tmp_path):
  """32-bit float images (PFM, float TIFF): Pillow hands back a read-only buffer."""
  data = np.linspace(-0.5, 1.5, 1200, dtype=np.float32).reshape(30, 40)
  Image.fromarray(data).save(tmp_path / 'f.tif')
  image, info = image_io.read_image(tmp_path / 'f.tif')
  assert image.shape == (30, 40, 1) and info.bit_depth == 16
  np.testing.assert_allclose(image[..., 0], np.clip(data, 0, 1))


def test_32bit_integer_tiff_spans_its_range(tmp_path):
  """A 32-bit integer TIFF's white is its type's largest value, not 16-bit white (it had been
  clipped to white above 65535)."""
  ramp = np.linspace(0, 2 ** 31 - 1, 30 * 40).reshape(30, 40).astype(np.int32)
  Image.fromarray(ramp, 'I').save(tmp_path / 'i32.tif')
  image, info = image_io.read_image(tmp_path / 'i32.tif')
  assert image.shape == (30, 40, 1) and info.bit_depth == 16
  np.testing.assert_allclose(image[..., 0], ramp / (2 ** 31 - 1), atol=1e-6)
  (loaded,) = data.load_images(tmp_path, min_size=8)  # training reads it alike
  np.testing.assert_array_equal(loaded[..., 0], np.round(ramp * (255 / (2 ** 31 - 1))))
  # Unsigned (SampleFormat 1, which Pillow does not write: set in the file's first directory).
  tiff = bytearray((tmp_path / 'i32.tif').read_bytes())
  (ifd,) = struct.unpack('<I', tiff[4:8])
  for entry in range(ifd + 2, ifd + 2 + 12 * struct.unpack('<H', tiff[ifd:ifd + 2])[0], 12):
    if struct.unpack('<H', tiff[entry:entry + 2])[0] == 339:
      tiff[entry + 8:entry + 10] = struct.pack('<H', 1)
  (tmp_path / 'i32.tif').write_bytes(tiff)
  image, _ = image_io.read_image(tmp_path / 'i32.tif')
  np.testing.assert_allclose(image[..., 0], ramp / (2 ** 32 - 1), atol=1e-6)
  # 16-bit data in a 32-bit file (no sample above 65535): read as 16-bit, not as black.
  counts = np.linspace(0, 65535, 30 * 40).reshape(30, 40).astype(np.int32)
  Image.fromarray(counts, 'I').save(tmp_path / 'counts.tif')
  image, _ = image_io.read_image(tmp_path / 'counts.tif')
  np.testing.assert_allclose(image[..., 0], counts / 65535, atol=1e-6)


def test_peek_reads_the_header_as_read_image_will_turn_it(tmp_path):
  im = Image.fromarray(np.zeros((40, 60, 3), np.uint8))  # 60 wide, 40 high
  exif = Image.Exif()
  exif[0x0112] = 6  # turned a quarter: read as 40 wide, 60 high
  im.save(tmp_path / 'turned.jpg', exif=exif)
  image, _ = image_io.read_image(tmp_path / 'turned.jpg')
  assert image.shape[:2] == (60, 40)
  assert image_io.peek(tmp_path / 'turned.jpg') == (40, 60, 3, 8)
  im.save(tmp_path / 'turned.png', exif=exif)  # Pillow writes the eXIf chunk before the pixels
  assert image_io.read_image(tmp_path / 'turned.png')[0].shape[:2] == (60, 40)
  assert image_io.peek(tmp_path / 'turned.png') == (40, 60, 3, 8)
  im.convert('P').save(tmp_path / 'p.png')  # a palette without transparency: RGB
  assert image_io.peek(tmp_path / 'p.png') == (60, 40, 3, 8)
  im.convert('P').save(tmp_path / 'pt.png', transparency=0)
  assert image_io.peek(tmp_path / 'pt.png') == (60, 40, 4, 8)
  Image.fromarray(np.zeros((4, 5), np.uint16)).save(tmp_path / 'g16.png')
  assert image_io.peek(tmp_path / 'g16.png') == (5, 4, 1, 16)


def test_long_file_name_written(tmp_path):
  """80 CJK characters are 240 bytes: the temporary file beside it must not pass 255."""
  name = '\u7d75' * 80 + '.png'
  image_io.write_image(tmp_path / name, np.zeros((2, 2, 3)))
  assert os.listdir(tmp_path) == [name]


def test_atomic_write_keeps_old_file_and_leaves_no_temp(tmp_path):
  target = tmp_path / 'x.png'
  target.write_bytes(b'old')

  def broken(f):
    f.write(b'partial')
    raise OSError(28, 'No space left on device')
  with pytest.raises(image_io.ImageError, match='x.png: cannot write: No space left'):
    image_io.atomic_write(target, broken)
  assert target.read_bytes() == b'old'
  assert os.listdir(tmp_path) == ['x.png']
  with pytest.raises(image_io.ImageError, match='cannot write'):
    image_io.write_image(tmp_path / 'missing' / 'y.png', np.zeros((2, 2, 3)))
  image_io.write_image(target, np.zeros((2, 2, 3)))
  assert os.listdir(tmp_path) == ['x.png']
  assert oct(os.stat(target).st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


def test_unreadable_files_give_one_line_errors(tmp_path):
  for size in range(4):  # (Pillow's DIB test reads 4 bytes: a shorter file had been a traceback)
    (tmp_path / 'short.png').write_bytes(b'B' * size)
    with pytest.raises(image_io.ImageError, match='short.png: cannot read'):
      image_io.read_image(tmp_path / 'short.png')
  (tmp_path / 'notes.png').write_text('not an image')
  with pytest.raises(image_io.ImageError, match=r'notes.png: cannot read: not an image') as e:
    image_io.read_image(tmp_path / 'notes.png')
  assert '\n' not in str(e.value)
  Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / 'full.png')
  (tmp_path / 'cut.png').write_bytes((tmp_path / 'full.png').read_bytes()[:60])
  with pytest.raises(image_io.ImageError, match='cut.png: cannot read'):
    image_io.read_image(tmp_path / 'cut.png')
  with pytest.raises(image_io.ImageError, match='gone.png: cannot read'):
    image_io.read_image(tmp_path / 'gone.png')


def test_output_format_and_dtype():
  assert image_io.output_format('a.JPG') == 'jpeg'
  assert image_io.output_format('a.png', 'webp') == 'webp'
  with pytest.raises(image_io.ImageError, match='output format'):
    image_io.output_format('a.bmp')
  info16 = image_io.ImageInfo('I;16', 1, 16)
  assert image_io.output_dtype(info16, 'png') == np.uint16
  assert image_io.output_dtype(info16, 'jpeg') == np.uint8
  assert image_io.to_uint(np.array([65535, 0, 32896], np.uint16), 8).tolist() == [255, 0, 128]


def test_print_resolution_kept(tmp_path):
  Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / 'in.png', dpi=(300, 300))
  image, info = image_io.read_image(tmp_path / 'in.png')
  assert info.dpi == (300.0, 300.0)
  data16 = _rng().integers(0, 65536, (4, 5, 3), dtype=np.uint16)
  for name, array in [('out.png', image), ('out.jpg', image), ('out16.png', data16)]:
    image_io.write_image(tmp_path / name, array, info)
    with Image.open(tmp_path / name) as im:
      assert tuple(round(float(v)) for v in im.info['dpi']) == (300, 300), name
  image_io.write_image(tmp_path / 'none.png', image)
  assert image_io.read_image(tmp_path / 'none.png')[1].dpi is None
  # A turned image's resolution turns with it; a TIFF without resolution tags has none (Pillow
  # says 1 dpi for it, which had gone into the output: a 128-inch-wide print).
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / 'turned.jpg', dpi=(300, 150),
                                                       exif=exif)
  assert image_io.read_image(tmp_path / 'turned.jpg')[1].dpi == (150.0, 300.0)
  Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / 'plain.tif')
  assert image_io.read_image(tmp_path / 'plain.tif')[1].dpi is None
  Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / 'dpi.tif', dpi=(200, 100))
  assert image_io.read_image(tmp_path / 'dpi.tif')[1].dpi == (200.0, 100.0)


@pytest.mark.parametrize('mode', ['L', 'RGB', 'RGBA', 'I;16', 'F', 'CMYK'])
def test_uncompressed_tiff_turned_a_quarter(tmp_path, mode):
  """Given a path, Pillow memory-mapped uncompressed L/RGBA/16-bit/CMYK TIFFs at their turned
  size: EXIF orientation 5-8 scrambled them (written as if done)."""
  mark = np.zeros((30, 50), np.uint8)
  mark[:5, :10] = 255
  exif = Image.Exif()
  exif[0x0112] = 6
  im = Image.fromarray(mark.astype(np.uint16) * 257) if mode == 'I;16' else (
      Image.fromarray(mark).convert(mode))
  im.save(tmp_path / 'turned.tif', exif=exif)
  image, _ = image_io.read_image(tmp_path / 'turned.tif')
  grey = image[..., :3].mean(-1)
  grey = (grey - grey.min()) / (grey.max() - grey.min())
  np.testing.assert_allclose(grey, np.rot90(mark, -1) / 255, atol=0.02)
  assert image_io.peek(tmp_path / 'turned.tif')[:2] == (30, 50)  # width, height: as read
  (loaded,) = data.load_images(tmp_path, min_size=8)  # training reads it whole too
  assert loaded.shape[:2] in ((30, 50), (50, 30))
  assert (loaded[..., 0] > 128).sum() == 50


def test_tiff_layouts_pillow_misreads_or_refuses(tmp_path):
  tifffile = pytest.importorskip('tifffile')
  yy, xx = np.mgrid[:12, :16]
  planes = np.stack([xx * 4000, yy * 5000, xx * 2000]).astype(np.uint16)
  for order in '<>':  # 16-bit, separate colour planes, uncompressed: had read as garbage
    tifffile.imwrite(tmp_path / 'planar.tif', planes, photometric='rgb', planarconfig='separate',
                     byteorder=order)
    image, _ = image_io.read_image(tmp_path / 'planar.tif')
    np.testing.assert_allclose(image, np.moveaxis(planes, 0, -1) / 65535, atol=1 / 255)
  tifffile.imwrite(tmp_path / 'rgbf.tif', np.zeros((4, 5, 3), np.float32), photometric='rgb')
  with pytest.raises(image_io.ImageError, match='rgbf.tif: cannot read: a TIFF of a layout '
                     r'Pillow does not read \(unknown pixel mode; it reads 1 to 4 channels of 8 '
                     r'bits, one channel of 16 or 32 bits or float, RGB of 16 bits\): save it as '
                     r'8- or 16-bit RGB\(A\)'):
    image_io.read_image(tmp_path / 'rgbf.tif')
  # A compressed TIFF cut short (its directory, after the pixels, gone): said so, not a layout.
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / 'full.tif',
                                                        compression='tiff_adobe_deflate')
  whole = (tmp_path / 'full.tif').read_bytes()
  (tmp_path / 'cut.tif').write_bytes(whole[:len(whole) // 2])
  with pytest.raises(image_io.ImageError, match=r'cut.tif: cannot read: the file is cut short '
                     r'\(its TIFF image directory lies past its end\)$'):
    image_io.read_image(tmp_path / 'cut.tif')
  # Another format's own reason where its signature is there: a PNG chunk's bad checksum.
  info = PngImagePlugin.PngInfo()
  info.add_text('k', 'v')
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'crc.png', pnginfo=info)
  data = bytearray((tmp_path / 'crc.png').read_bytes())
  data[data.index(b'tEXt') + 7] ^= 0xff
  (tmp_path / 'crc.png').write_bytes(bytes(data))
  with pytest.raises(image_io.ImageError, match=r"crc.png: cannot read: PNG file: broken PNG "
                     r"file \(bad header checksum in b'tEXt'\)"):
    image_io.read_image(tmp_path / 'crc.png')


@pytest.mark.parametrize('bits', [8, 16])
def test_png_gamma_and_text_carried_into_png(tmp_path, bits):
  info = PngImagePlugin.PngInfo()
  info.add_text('parameters', 'steps: 20')
  info.add_itxt('Comment', 'ünïcode', zip=True)
  info.add(b'gAMA', struct.pack('>I', 100000))  # linear data
  Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / 'in.png', pnginfo=info)
  image, read = image_io.read_image(tmp_path / 'in.png')
  image_io.write_image(tmp_path / 'out.png', image if bits == 8 else image_io.to_uint(image, 16),
                       read)
  with Image.open(tmp_path / 'out.png') as im:
    im.load()
    assert (im.info['gamma'], im.info['parameters'], im.info['Comment']) == (
        1.0, 'steps: 20', 'ünïcode')
  image_io.write_image(tmp_path / 'out.webp', image, read)  # (WebP and JPEG have no such chunks)


def test_xmp_and_raw_exif_profiles_are_not_carried(tmp_path):
  """An XMP or ImageMagick EXIF text chunk's orientation is applied on reading: carried into the
  output, it had turned the image again for every reader."""
  info = PngImagePlugin.PngInfo()
  info.add_itxt('XML:com.adobe.xmp', '<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>')
  info.add_text('Comment', 'kept')
  Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / 'xmp.png', pnginfo=info)
  image, read = image_io.read_image(tmp_path / 'xmp.png')
  assert image.shape[:2] == (6, 4)
  assert image_io.peek(tmp_path / 'xmp.png')[:2] == (4, 6)  # width, height: as read_image turns it
  image_io.write_image(tmp_path / 'out.png', image, read)
  again, _ = image_io.read_image(tmp_path / 'out.png')
  assert again.shape[:2] == (6, 4)
  with Image.open(tmp_path / 'out.png') as im:
    assert im.info.get('Comment') == 'kept' and 'XML:com.adobe.xmp' not in im.info
