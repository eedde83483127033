"""The order of serial sections given in an unknown order, from the images alone.

Consecutive sections share their outline and inner structures more than distant ones do, so the
likeliest order is the shortest path through all sections under a dissimilarity: here ``1 -``
the best global NCC of a rotation search (mirrored included) on small thumbnails.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

def estimate_order(images: Sequence, size: int = 128) -> tuple[list[int], np.ndarray]:
    """A stack order for sections given in an unknown order, and the distances it came from.

    Each pair of sections is scored by the best global NCC of the rotation search (mirrored
    included) on ``size`` px thumbnails; the distance is ``1 - NCC``. The order is the shortest
    path through all sections (exact for up to 8 sections, greedy from every start plus 2-opt
    beyond). Consecutive sections share their outline and inner structures more than distant
    ones, so the shortest path is the likeliest order, up to its direction."""
    from .stages.initial import centroid, polar_angle_scores
    from .stages.preprocess import level_shape, pad_to, resample, to_grey

    thumbs = []
    for image in images:
        grey = to_grey(_thumbnail(image, size * 4))
        thumbs.append(1.0 - (grey - grey.min()) / max(float(grey.max() - grey.min()), 1e-6))  # tissue bright
    side = max(max(t.shape) for t in thumbs)
    canvas = (side, side)
    small = [resample(pad_to(t, canvas)[0], level_shape(canvas, size)).cpu().numpy() for t in thumbs]
    # each thumbnail and its mirror image, with their centroids, once
    views = [[(torch.as_tensor(v)[None, None], centroid(v)) for v in (t, np.ascontiguousarray(t[:, ::-1]))] for t in small]
    n = len(small)
    angles = np.arange(0.0, 360.0, 2.0)
    similarity = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            target, target_centre = views[j][0]
            best = max(float(np.max(polar_angle_scores(view, target, angles, target_centre, centre)))
                       for view, centre in views[i])
            similarity[i, j] = similarity[j, i] = best
    distances = 1.0 - similarity
    return shortest_path(distances), distances


def _thumbnail(image, size: int) -> np.ndarray:
    from .stack import _is_lazy

    if _is_lazy(image):
        from .slides import open_slide

        slide = open_slide(image)
        return np.asarray(slide.read(slide.level_for(size)), dtype=np.float32)
    array = np.asarray(image, dtype=np.float32)
    h, w = array.shape[:2]
    step = max(1, int(max(h, w) // size))
    return array[::step, ::step]


def shortest_path(distances: np.ndarray) -> list[int]:
    """The order visiting every node once with the least total distance between consecutive
    nodes (an open path): exact (every order) up to 8 nodes, else greedy from each
    start improved by 2-opt. Returned starting from the smaller end index."""
    d = np.asarray(distances, dtype=np.float64)
    n = len(d)
    if n <= 2:
        return list(range(n))
    if n <= 8:
        import itertools

        best, best_cost = None, np.inf
        for perm in itertools.permutations(range(n)):
            if perm[0] > perm[-1]:
                continue  # a path and its reverse are one
            cost = sum(d[perm[k], perm[k + 1]] for k in range(n - 1))
            if cost < best_cost - 1e-12:
                best, best_cost = list(perm), cost
        return best

    def cost(path):
        return sum(d[path[k], path[k + 1]] for k in range(n - 1))

    best, best_cost = None, np.inf
    for first in range(n):
        path, left = [first], set(range(n)) - {first}
        while left:
            nxt = min(left, key=lambda j: d[path[-1], j])
            path.append(nxt)
            left.remove(nxt)
        improved = True
        while improved:
            improved = False
            for i in range(1, n - 1):
                for j in range(i + 1, n):
                    candidate = path[:i] + path[i : j + 1][::-1] + path[j + 1 :]
                    if cost(candidate) < cost(path) - 1e-12:
                        path, improved = candidate, True
        if cost(path) < best_cost:
            best, best_cost = path, cost(path)
    return best if best[0] < best[-1] else best[::-1]
