#!/bin/sh
# System packages napari needs for a window and the GUI tests need under Xvfb (Debian/Ubuntu):
# Xvfb + Mesa for an OpenGL canvas, the xcb/xkb libraries Qt 6's xcb platform loads, and
# Python's venv module where the distribution ships it apart (Debian's python3-venv).
# As root it runs apt-get itself; as a user, through sudo. README set-up command 2 runs it.
set -eu
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "install-system-packages.sh: run it as root, or install sudo" >&2
    exit 1
fi
PACKAGES="xvfb xauth libgl1-mesa-dri libgl1 libegl1 libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4 libxcb-image0
libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-xinerama0 libxcb-xfixes0 libdbus-1-3 libfontconfig1"
if ! python3 -c "import ensurepip" 2>/dev/null; then
    PACKAGES="$PACKAGES python3-venv"
fi
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
# shellcheck disable=SC2086  # the list is split on purpose
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null
echo "system packages installed: $(echo $PACKAGES | wc -w) packages"
