"""Build of the optional extension unimoe_kernels._C with CMake; metadata is in pyproject.toml.

`pip install .` and `pip install -e .` both run CMakeBuild below: it configures CMakeLists.txt
(Ninja when found, Release, pybind11's CMake config), builds into build_temp and copies the module
to self.get_ext_fullpath(), which setuptools then installs or, for an editable install, copies
next to the sources (unimoe_kernels/_C*.so).

The extension is optional: when cmake or a compiler fails the install goes on without _C (the
package falls back to torch) unless UNIMOE_REQUIRE_EXT=1. Other environment variables:
  UNIMOE_NO_CUDA=1        build _C without its CUDA kernels
  UNIMOE_CUDA_ARCHS=90    CUDA architectures (CMake list, default "80;90"); CUDAARCHS also works
  UNIMOE_BUILD_JOBS=N     parallel compile jobs (default 2)
  CUDACXX=/path/nvcc      the CUDA compiler, when nvcc is not on PATH
"""

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _find_cmake():
    path = shutil.which("cmake")
    if path:
        return path
    try:  # the `cmake` PyPI package, when installed instead of a system cmake
        import cmake

        return os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
    except ImportError:
        return None


def _find_ninja():
    path = shutil.which("ninja")
    if path:
        return path
    try:
        import ninja

        return os.path.join(ninja.BIN_DIR, "ninja")
    except ImportError:
        return None


class CMakeExtension(Extension):
    """An extension whose sources CMake compiles; setuptools only sees its name."""

    def __init__(self, name: str, sourcedir: Path = ROOT):
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


class CMakeBuild(build_ext):
    def build_extensions(self):
        # Iterate over a copy: a failed extension is dropped from self.extensions so that the
        # editable-install copy step and the wheel's file list do not look for it.
        for ext in list(self.extensions):
            try:
                self.build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any build failure has the same remedy
                if _env_flag("UNIMOE_REQUIRE_EXT"):
                    raise
                self.extensions.remove(ext)
                self._remove_stale_inplace(ext)
                bar = "=" * 78
                print(
                    f"\n{bar}\nWARNING: building the optional extension {ext.name} failed:\n"
                    f"  {exc}\nunimoe_kernels is installed without it and uses its torch/Triton "
                    f"paths.\nSet UNIMOE_REQUIRE_EXT=1 to make this an error.\n{bar}\n",
                    file=sys.stderr,
                )

    def _remove_stale_inplace(self, ext):
        # An editable install imports _C from the source tree: a module left there by an older
        # build would be silently used with newer sources, so drop it with the failed build.
        if not getattr(self, "editable_mode", False):
            return
        package, _, _ = ext.name.rpartition(".")
        package_dir = self.get_finalized_command("build_py").get_package_dir(package)
        stale = Path(package_dir) / Path(self.get_ext_filename(ext.name)).name
        if stale.exists():
            stale.unlink()
            print(f"removed the stale {stale}", file=sys.stderr)

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        cmake = _find_cmake()
        if cmake is None:
            raise RuntimeError("cmake was not found on PATH nor as the `cmake` Python package")
        import pybind11

        build_temp = Path(self.build_temp).resolve() / ext.name
        out_dir = build_temp / "out"
        args = [
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DUNIMOE_OUTPUT_DIR={out_dir}",
            f"-DUNIMOE_NO_CUDA={'ON' if _env_flag('UNIMOE_NO_CUDA') else 'OFF'}",
        ]
        if os.environ.get("UNIMOE_CUDA_ARCHS"):
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['UNIMOE_CUDA_ARCHS']}")
        default_nvcc = "/usr/local/cuda/bin/nvcc"  # the toolkit's standard place, often off PATH
        if not (os.environ.get("CUDACXX") or shutil.which("nvcc")) and os.path.exists(default_nvcc):
            args.append(f"-DCMAKE_CUDA_COMPILER={default_nvcc}")
        # A CMake cache keeps the interpreter, pybind11 dir (temporary in pip's isolated builds)
        # and options of the build that made it: start afresh whenever any of them changes.
        stamp = build_temp / "unimoe-build-key.txt"
        key = "\n".join([sys.executable, *args])
        if build_temp.exists() and (not stamp.exists() or stamp.read_text() != key):
            shutil.rmtree(build_temp)
        build_temp.mkdir(parents=True, exist_ok=True)
        stamp.write_text(key)
        ninja = _find_ninja()
        if ninja and not (build_temp / "CMakeCache.txt").exists():  # fixed once configured
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]

        # Two jobs by default: nvcc takes GBs of memory per job and CI machines have 2 cores.
        jobs = os.environ.get("UNIMOE_BUILD_JOBS", "2")
        subprocess.run([cmake, "-S", ext.sourcedir, "-B", str(build_temp), *args], check=True)
        subprocess.run([cmake, "--build", str(build_temp), "--parallel", jobs], check=True)

        built = sorted(glob.glob(str(out_dir / "_C*.so")) + glob.glob(str(out_dir / "_C*.pyd")))
        if not built:
            raise RuntimeError(f"CMake finished but no _C module was found in {out_dir}")
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built[0], target)


def _readme() -> dict:
    # pyproject declares readme dynamic so a missing README.md cannot break the build.
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.exists() else "unimoe_kernels"
    return {"long_description": text, "long_description_content_type": "text/markdown"}


setup(
    ext_modules=[CMakeExtension("unimoe_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
    **_readme(),
)
