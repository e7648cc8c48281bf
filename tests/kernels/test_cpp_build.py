"""The CPU ops' build cache (kernels/cpp_build.py) is keyed by what the build reads: an
edited source or a header beside it gives a new directory, anything else the same one."""

from pathlib import Path

from loraserve.kernels import cpp_build


def test_the_cache_key_follows_the_source_and_its_headers(tmp_path: Path):
    source, header = tmp_path / "op.cpp", tmp_path / "helpers.h"
    source.write_text('#include "helpers.h"\n')
    header.write_text("inline int one() { return 1; }\n")
    first = cpp_build.build_dir("op", source, cpp_build.CFLAGS)
    (tmp_path / "notes.txt").write_text("not read by the build")
    assert cpp_build.build_dir("op", source, cpp_build.CFLAGS) == first
    header.write_text("inline int one() { return 2; }\n")
    after_header = cpp_build.build_dir("op", source, cpp_build.CFLAGS)
    source.write_text('#include "helpers.h"\n// edited\n')
    after_source = cpp_build.build_dir("op", source, cpp_build.CFLAGS)
    assert len({first, after_header, after_source}) == 3
    assert cpp_build.build_dir("op", source, [*cpp_build.CFLAGS, "-ffp-contract=off"]) != after_source
