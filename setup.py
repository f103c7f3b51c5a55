"""Build step for the Cython engine ``ringblob._uring``.

Everything declarative lives in pyproject.toml; this file only declares the
extension, which links against the system liburing (Debian 12: 2.3).
"""
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "ringblob._uring",
        sources=["cython/_uring.pyx"],
        include_dirs=["cython"],
        libraries=["uring"],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["cython"],
        compiler_directives={"language_level": "3", "embedsignature": True},
    ),
)
