"""Build step for the Cython extensions: the engine ``ringblob._uring``, the store's index ``ringblob._index``,
page allocator ``ringblob._alloc`` and journal encoders ``ringblob._format``, the engine
adapter's request path ``ringblob._aiocore``, the store's GET path ``ringblob._storeget`` and the
server's request path ``ringblob._srvcore``.

Everything declarative lives in pyproject.toml; this file only declares the
extensions. The engine links against the system liburing (Debian 12: 2.3); the
others need nothing beyond libc.
"""
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "ringblob._uring",
        sources=["cython/_uring.pyx"],
        include_dirs=["cython"],
        libraries=["uring"],
    ),
    Extension(
        "ringblob._index",
        sources=["cython/_index.pyx"],
        include_dirs=["cython"],
    ),
    Extension(
        "ringblob._alloc",
        sources=["cython/_alloc.pyx"],
        include_dirs=["cython"],
    ),
    Extension(
        "ringblob._aiocore",
        sources=["cython/_aiocore.pyx"],
        include_dirs=["cython"],
    ),
    Extension(
        "ringblob._storeget",
        sources=["cython/_storeget.pyx"],
        include_dirs=["cython"],
    ),
    Extension(
        "ringblob._srvcore",
        sources=["cython/_srvcore.pyx"],
        include_dirs=["cython"],
    ),
    Extension(
        "ringblob._format",
        sources=["cython/_format.pyx"],
        include_dirs=["cython"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["cython"],
        compiler_directives={"language_level": "3", "embedsignature": True},
    ),
)
