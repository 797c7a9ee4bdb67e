"""w2x-jax: waifu2x-style super-resolution and JPEG-noise removal in JAX/Flax."""

__version__ = '0.1.0'
