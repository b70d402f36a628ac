#!/usr/bin/env bash
# Install the Debian packages that the documentation build and its browser test need:
# chromium and chromium-driver (tests/test_docs_site.py drives them with Selenium), and npm
# where it is missing (scripts/build_docs.sh installs MathJax with it). Needs root for
# apt-get; without root it prints the command to run and exits with status 1.
set -euo pipefail

packages=()
[[ -x /usr/bin/chromium ]] || packages+=(chromium)
[[ -x /usr/bin/chromedriver ]] || packages+=(chromium-driver)
command -v npm >/dev/null || packages+=(npm)
if ((${#packages[@]} == 0)); then
  echo "install_docs_tools: chromium, chromium-driver and npm are already installed"
  exit 0
fi

if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
  echo "install_docs_tools: run as root: apt-get install -y ${packages[*]}" >&2
  exit 1
fi
if ! apt-get install -y -q "${packages[@]}" >/dev/null 2>&1; then
  apt-get update -q >/dev/null
  apt-get install -y -q "${packages[@]}" >/dev/null
fi
echo "install_docs_tools: installed ${packages[*]}"
