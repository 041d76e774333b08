"""Packaging for looppool. The version lives only in looppool/_version.py."""

import pathlib
import re

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).resolve().parent


def read_version():
    # Parsed, not imported: importing looppool would need its dependencies at build time.
    text = (HERE / 'looppool' / '_version.py').read_text(encoding='utf-8')
    match = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    if match is None:
        raise RuntimeError('looppool/_version.py does not set __version__')
    return match.group(1)


setup(
    name='looppool',
    version=read_version(),
    description='A pool of worker processes, each running its own Tornado IO loop, '
                'with message passing to and from the parent loop',
    long_description=(HERE / 'README.rst').read_text(encoding='utf-8'),
    long_description_content_type='text/x-rst',
    license_expression='Apache-2.0',   # SPDX (setuptools 77 or later: see pyproject.toml)
    license_files=['LICENSE'],
    keywords='python tornado asyncio multiprocessing process-pool io-loop',
    packages=find_packages(include=['looppool', 'looppool.*']),
    package_data={'looppool': ['py.typed']},
    include_package_data=False,
    zip_safe=False,
    python_requires='>=3.10',
    install_requires=[
        'tornado>=6.1',
        'psutil',
        'statsd',
        'setproctitle',
    ],
    extras_require={
        'test': [
            'pytest',
            'pytest-timeout',
            'hypothesis',
            'sphinx',
            'furo',          # the manual's theme
            'gunicorn',
            'mypy',
            # the server recipes examples/server_flask.py and server_uwsgi.py, run by
            # tests/test_servers.py; uWSGI builds from source with a C compiler
            'flask',
            'uwsgi',
            # the ASGI recipe examples/server_fastapi.py: FastAPI on gunicorn's uvicorn
            # workers (uvicorn's own gunicorn worker class now lives in uvicorn-worker)
            'fastapi',
            'uvicorn',
            'uvicorn-worker',
            # the extra below, for tests/test_prometheus.py
            'prometheus_client',
            # the reload extra, for tests/test_reload.py
            'watchfiles',
            # the otel extra and the SDK's in-memory exporter, for tests/test_tracing.py
            'opentelemetry-api',
            'opentelemetry-sdk',
        ],
        # the caller's trace context in the worker's handler (looppool.tracing)
        'otel': ['opentelemetry-api'],
        'prometheus': ['prometheus_client'],
        # Pool(reload=True): inotify (kernel notifications) rather than polling, maintained
        'reload': ['watchfiles'],
        'dask': ['distributed'],
        'bench': ['aiomultiprocess', 'matplotlib'],
    },
    classifiers=[
        'Development Status :: 4 - Beta',
        'Framework :: AsyncIO',
        'Intended Audience :: Developers',
        'Operating System :: POSIX',
        'Programming Language :: Python :: 3',
        'Programming Language :: Python :: 3 :: Only',
        'Programming Language :: Python :: 3.10',
        'Programming Language :: Python :: 3.11',
        'Programming Language :: Python :: 3.12',
        'Programming Language :: Python :: 3.13',
        'Topic :: Software Development :: Libraries',
        'Typing :: Typed',
    ],
)
