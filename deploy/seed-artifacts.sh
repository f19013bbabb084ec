#!/bin/sh
# Seed an artifact volume with the models baked into the image, so that the trainer job after it
# (`python -m trainer train --skip-existing`) finds a valid artifact and exits at once, and the
# service is up in seconds instead of after a training run.
#
#   seed-artifacts SOURCE_ROOT TARGET_ROOT      (both laid out as <model>/<version>/)
#
# A model that already has a version under TARGET_ROOT is left alone: seeding never overwrites
# or adds to a trained model. Each version is copied under a hidden name and then renamed into
# place, so a reader sees a complete version or none (the trainer writes versions the same way).
# SEED_DEFAULT_MODEL=0 turns seeding off: the trainer job then trains on an empty volume.
set -eu

usage="usage: seed-artifacts SOURCE_ROOT TARGET_ROOT"
src=${1:?$usage}
dst=${2:?$usage}

case "${SEED_DEFAULT_MODEL:-1}" in
    0 | false | no)
        echo "seed-artifacts: SEED_DEFAULT_MODEL=$SEED_DEFAULT_MODEL, not seeding"
        exit 0
        ;;
esac

is_version() {
    case "$1" in
        '' | *[!0-9]*) return 1 ;;
    esac
}

has_version() {
    for entry in "$1"/*/; do
        [ -d "$entry" ] || continue
        entry=${entry%/}
        if is_version "${entry##*/}"; then
            return 0
        fi
    done
    return 1
}

for model_dir in "$src"/*/; do
    [ -d "$model_dir" ] || continue
    model_dir=${model_dir%/}
    name=$(basename "$model_dir")
    if has_version "$dst/$name"; then
        echo "seed-artifacts: $dst/$name already has a version, leaving it alone"
        continue
    fi
    mkdir -p "$dst/$name"
    for version_dir in "$model_dir"/*/; do
        [ -d "$version_dir" ] || continue
        version_dir=${version_dir%/}
        version=$(basename "$version_dir")
        is_version "$version" || continue
        incoming="$dst/$name/.seed-$version"
        rm -rf "$incoming"
        cp -R "$version_dir" "$incoming"
        mv "$incoming" "$dst/$name/$version"
        echo "seed-artifacts: seeded $dst/$name/$version"
    done
done
