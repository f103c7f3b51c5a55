"""Build step for the Cython extensions: the engine ``ringblob._uring``; the store's key index
``ringblob._index``, page allocator ``ringblob._alloc`` and journal encoders ``ringblob._format``; the
engine adapter's request path ``ringblob._aiocore``; the store's GET path ``ringblob._storeget`` and its
PUT path and group-commit loops ``ringblob._storeput``, and the value received into leased fixed
buffers ``ringblob._leased``; the server's request path ``ringblob._srvcore``.

Everything declarative lives in pyproject.toml; this file only declares the
extensions. The engine links against the system liburing (Debian 12: 2.3); the
others need nothing beyond libc.
"""
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(f"ringblob.{name}", sources=[f"cython/{name}.pyx"], include_dirs=["cython"], libraries=libs)
    for name, libs in (
        ("_uring", ["uring"]),
        ("_index", []),
        ("_alloc", []),
        ("_format", []),
        ("_aiocore", []),
        ("_storeget", []),
        ("_storeput", []),
        ("_srvcore", []),
        ("_leased", []),
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["cython"],
        compiler_directives={"language_level": "3", "embedsignature": True},
    ),
)
