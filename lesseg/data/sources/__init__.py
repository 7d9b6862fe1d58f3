"""Dataset sources, one module per family of on-disk formats; importing this package registers them all in
``SOURCES``.

- :mod:`.files`: what the formats share (:class:`~.files.FileSource`: options, split names and split files,
  missing-file checks; label-table helpers)
- :mod:`.folder`: the generic folder format (``folder``) and the embedded dataset (``shapes``)
- :mod:`.voc`: PASCAL VOC 2012 + SBD (``voc``)
- :mod:`.cityscapes`: Cityscapes, GTAV, SYNTHIA and the SYNTHIA -> Cityscapes protocols (``cityscapes``,
  ``gtav``, ``synthia``)
"""

from . import cityscapes, files, folder, voc

__all__ = ["cityscapes", "files", "folder", "voc"]
