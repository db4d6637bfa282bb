"""Command-line tools run and print what their users read."""

import re

from convstem_jax.tools import bench_input


def test_bench_input_prints_per_core_rate_last(capsys):
  bench_input.main(["--images", "4", "--seconds", "0.5"])
  lines = capsys.readouterr().out.strip().splitlines()
  assert re.fullmatch(r"\d+\.\d images/s per core", lines[-1]), lines
  assert float(lines[-1].split()[0]) > 0
  assert "4 JPEGs" in lines[0]


def test_generated_jpegs_have_imagenet_like_sizes():
  import tensorflow as tf
  for data in bench_input.make_jpegs(3):
    h, w, c = tf.io.decode_jpeg(data).shape
    assert 300 <= h <= 500 and 300 <= w <= 500 and c == 3
