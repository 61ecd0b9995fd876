#!/bin/sh
# Regenerate data/kjv.txt.gz from Debian's bible-kjv packages (see data/README.md). Needs apt-get and gzip.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
apt-get download bible-kjv-text bible-kjv
for deb in *.deb; do dpkg-deb -x "$deb" root; done
./root/usr/bin/bible -p "$work/root/usr/lib" -f "gen1:1-rev22:21" | sed -E 's/^[^ ]+ //' > kjv.txt
test "$(wc -l < kjv.txt)" -eq 31102
gzip -9 -n -c kjv.txt > "$here/kjv.txt.gz"
echo "wrote $here/kjv.txt.gz ($(wc -c < kjv.txt) bytes of text)"
