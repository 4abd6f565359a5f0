"""Medical image data: readers, the paper's preprocessing, caches, datasets and phantoms (SPEC §4).

- Readers: :func:`read_nifti` (``(D, H, W)`` canonical volumes with spacing in mm) and
  :func:`read_picture` (``(C, H, W)`` in [0, 1]); with the ``dicom`` extra, :func:`scan_dicom`
  groups DICOM files into series read by :func:`read_dicom_series` as the same canonical volumes,
  and :func:`read_dicom_picture` reads 2D X-ray images; a bad file raises :class:`ReadError` naming it.
- Transforms (:mod:`invcoss.data.transforms`): small callables for resampling, intensity windows,
  z-scoring, resizing, sliding windows and patches; :func:`get_config` gives the ``paper`` and
  ``quick`` profiles and :class:`Preprocessor` applies one to a file.
- :func:`preprocess`: a folder → a cache of memory-mapped ``.npy`` sub-volumes + ``manifest.json``;
  :class:`CachedDataset`, :class:`FolderDataset` and :func:`open_dataset` read them for training.
- Phantoms: :func:`write_phantoms` writes procedural CT, MRI, X-ray and pathology files.

Example:
    >>> import tempfile
    >>> from invcoss.data import open_dataset, preprocess, write_phantoms
    >>> src, cache = tempfile.mkdtemp(), tempfile.mkdtemp()
    >>> _ = write_phantoms(src, "ct", 1, size=(20, 48, 48), spacing=(3.0, 2.0, 2.0))
    >>> report = preprocess(src, cache, "ct", "quick")
    >>> ds = open_dataset(cache, "ct")
    >>> len(ds), tuple(ds[0].shape)
    (4, (1, 16, 96, 96))
"""

from invcoss.data.atomic import atomic_save_npy, atomic_write_bytes, atomic_write_json
from invcoss.data.cache import NoSamplesError, PreprocessReport, list_files, preprocess, read_manifest
from invcoss.data.datasets import CachedDataset, FolderDataset, open_dataset
from invcoss.data.dicom import DicomImage, DicomSeries, read_dicom_picture, read_dicom_series, scan_dicom
from invcoss.data.phantoms import (
    PHANTOM_MODALITIES,
    PhantomExistsError,
    ct_phantom,
    mri_phantom,
    pathology_phantom,
    write_phantoms,
    xray_phantom,
)
from invcoss.data.pipeline import (
    FRAMES,
    MODALITIES,
    PROFILES,
    FileResult,
    PreprocessConfig,
    Preprocessor,
    Sample,
    config_for_input,
    get_config,
)
from invcoss.data.readers import (
    DEFAULT_LIMITS,
    SKIP_KINDS,
    Picture,
    ReadError,
    ReadLimits,
    Volume,
    VolumeHeader,
    nifti_geometry,
    picture_size,
    read_nifti,
    read_nifti_header,
    read_picture,
)
from invcoss.data.transforms import (
    Clip,
    Compose,
    FillNonFinite,
    GridPatches,
    IntensityWindow,
    ReplicateChannels,
    Resample,
    Resize,
    SlidingWindows,
    ToGrey,
    ZScore,
    window_starts,
)
from invcoss.data.writers import write_nifti, write_png

__all__ = [
    "DEFAULT_LIMITS",
    "FRAMES",
    "MODALITIES",
    "PHANTOM_MODALITIES",
    "PROFILES",
    "CachedDataset",
    "DicomImage",
    "DicomSeries",
    "Clip",
    "Compose",
    "FileResult",
    "FillNonFinite",
    "FolderDataset",
    "GridPatches",
    "IntensityWindow",
    "NoSamplesError",
    "Picture",
    "PreprocessConfig",
    "PreprocessReport",
    "Preprocessor",
    "ReadError",
    "ReadLimits",
    "ReplicateChannels",
    "Resample",
    "Resize",
    "SKIP_KINDS",
    "Sample",
    "SlidingWindows",
    "ToGrey",
    "Volume",
    "VolumeHeader",
    "ZScore",
    "atomic_save_npy",
    "atomic_write_bytes",
    "atomic_write_json",
    "config_for_input",
    "ct_phantom",
    "get_config",
    "list_files",
    "mri_phantom",
    "nifti_geometry",
    "open_dataset",
    "pathology_phantom",
    "picture_size",
    "preprocess",
    "read_manifest",
    "read_dicom_picture",
    "read_dicom_series",
    "read_nifti",
    "read_nifti_header",
    "read_picture",
    "scan_dicom",
    "window_starts",
    "write_nifti",
    "PhantomExistsError",
    "write_phantoms",
    "write_png",
    "xray_phantom",
]
