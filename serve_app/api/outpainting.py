"""An outpaint request's geometry: the padding on each side and the canvas it makes.

The canvas is the image plus `left`/`top`/`right`/`bottom`; `right` and `bottom` grow to
the next multiple of the model's size multiple (8, or 16), so any image can be extended
(the record echoes the padding used). The seam band must fit inside the image. What the
replica does with it is `serve_app.generation.outpaint`.
"""

from __future__ import annotations

from serve_app.api.validation import check_range
from serve_app.api.wire import OutpaintRequest
from serve_app.errors import InvalidRequest
from serve_app.registry import ModelSpec
from serve_app.settings import Limits


def outpaint_geometry(req: OutpaintRequest, spec: ModelSpec, source: tuple[int, int],
                      limits: Limits) -> tuple[int, int, tuple[int, int, int, int]]:
    """(width, height, (left, top, right, bottom)) of the canvas."""
    if req.width is not None or req.height is not None:
        raise InvalidRequest("outpaint takes no width/height: the output is the image plus "
                             "left/top/right/bottom")
    src_w, src_h = source
    for name in ("left", "top", "right", "bottom"):
        check_range(name, getattr(req, name), 0, limits.max_size)
    if not (req.left or req.top or req.right or req.bottom):
        raise InvalidRequest("Give the pixels to add on at least one side: left, top, right "
                             "or bottom (e.g. 64)")
    check_range("seam", req.seam, 0, max(0, min(src_w, src_h) // 2))
    multiple = spec.size_multiple
    right = req.right + (-(src_w + req.left + req.right)) % multiple
    bottom = req.bottom + (-(src_h + req.top + req.bottom)) % multiple
    width, height = src_w + req.left + right, src_h + req.top + bottom
    for name, value in (("width", width), ("height", height)):
        if value > limits.max_size:
            raise InvalidRequest(f"The outpainted {name} would be {value}, over the limit of "
                                 f"{limits.max_size}: add fewer pixels or send a smaller image")
    if width * height > limits.max_pixels:
        raise InvalidRequest(f"The outpainted image would be {width}x{height}, over the limit "
                             f"of {limits.max_pixels} pixels: add fewer pixels")
    return width, height, (req.left, req.top, right, bottom)
