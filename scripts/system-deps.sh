#!/usr/bin/env bash
# The programs medmm's tests and demo use beyond Python packages, checked and installed from Debian.
#   Orthanc + its DICOMweb plugin   PACS integration tests (a real archive on loopback)
#   storescu (dcmtk)                the DIMSE listener tests send studies with it
#   java                            METEOR 1.5 (pycocoevalcap runs it on the JVM)
#   cc (build-essential)            DeepSpeed builds its CPU ops (Adam, ...) at first use
#   chromium                        the evaluation report page is opened in a real headless browser
# Installs with apt-get when running as root or with password-less sudo; otherwise prints the one command to run.
set -euo pipefail

missing=()
need() {  # need PACKAGE TEST...
  local pkg=$1; shift
  if ! "$@" >/dev/null 2>&1; then missing+=("$pkg"); fi
}
need orthanc           test -x /usr/sbin/Orthanc
need orthanc-dicomweb  test -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so
need dcmtk             command -v storescu
need default-jre-headless command -v java
need build-essential   command -v cc
need chromium          sh -c 'command -v chromium || command -v chromium-browser'

if [ ${#missing[@]} -eq 0 ]; then
  echo "system-deps: all present (Orthanc + DICOMweb, dcmtk, java, cc, chromium)"
  exit 0
fi

cmd="apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ${missing[*]}"
if [ "$(id -u)" -eq 0 ]; then
  echo "system-deps: installing ${missing[*]}"
  sh -c "$cmd" >/dev/null
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  echo "system-deps: installing ${missing[*]} (sudo)"
  sudo -n sh -c "$cmd" >/dev/null
else
  echo "system-deps: missing ${missing[*]}; run: sudo sh -c '$cmd'" >&2
  exit 1
fi
