#!/usr/bin/env bash
# Runs examples/desktop_chat under Xvfb with Mesa's software OpenGL, sends a prompt, waits for
# the streamed reply and saves a screenshot; then closes the app (which saves the conversation)
# and starts it again on the saved state, checking the conversation is restored.
#
#   scripts/screenshot_desktop_chat.sh [OUT.png]   (default examples/desktop_chat/screenshot.png)
#
# Needs Xvfb, xwd and ImageMagick's convert; as root with apt they are installed when missing.
# Builds the example in release mode (its own target dir, CARGO_TARGET_DIR or
# /tmp/desktop-target: eframe is kept out of the workspace build).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-examples/desktop_chat/screenshot.png}"
PROMPT="${DESKTOP_CHAT_PROMPT:-Tell me about Mr. Darcy.}"

need=()
command -v Xvfb >/dev/null || need+=(xvfb)
command -v xwd >/dev/null || need+=(x11-apps)
# The first `convert` on PATH that is ImageMagick's.
CONVERT=""
for c in magick $(type -ap convert) convert-im6.q16; do
  if "$c" -version 2>/dev/null | grep -q ImageMagick; then CONVERT="$c"; break; fi
done
[ -n "$CONVERT" ] || need+=(imagemagick)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y "${need[@]}" libgl1-mesa-dri >/dev/null
    CONVERT="${CONVERT:-/usr/bin/convert}"
  else
    echo "missing: ${need[*]} (apt-get install ${need[*]} libgl1-mesa-dri)" >&2
    exit 1
  fi
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/tmp/desktop-target}"
(cd examples/desktop_chat && cargo build --release)
BIN="$CARGO_TARGET_DIR/release/desktop_chat"

WORK="$(mktemp -d)"
DISPLAY_NUM=":$((90 + RANDOM % 9))"
Xvfb "$DISPLAY_NUM" -screen 0 720x520x24 >/dev/null 2>&1 &
XVFB=$!
APP=""
cleanup() {
  [ -n "$APP" ] && kill "$APP" 2>/dev/null || true
  kill "$XVFB" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
sleep 1

run_app() {  # run_app DONE_FILE [PROMPT]
  env DISPLAY="$DISPLAY_NUM" LIBGL_ALWAYS_SOFTWARE=1 WINIT_UNIX_BACKEND=x11 \
    DESKTOP_CHAT_STATE_DIR="$WORK/state" DESKTOP_CHAT_DONE_FILE="$1" \
    DESKTOP_CHAT_QUIT_FILE="$WORK/quit" \
    ${2:+"DESKTOP_CHAT_PROMPT=$2"} "$BIN" >"$WORK/app.log" 2>&1 &
  APP=$!
}

wait_for() {  # wait_for FILE SECONDS
  for _ in $(seq 1 $(($2 * 10))); do
    [ -e "$1" ] && return 0
    kill -0 "$APP" 2>/dev/null || { cat "$WORK/app.log" >&2; return 1; }
    sleep 0.1
  done
  echo "timed out waiting for $1" >&2
  cat "$WORK/app.log" >&2
  return 1
}

run_app "$WORK/done1" "$PROMPT"
wait_for "$WORK/done1" 120
sleep 1  # the last frame
xwd -root -display "$DISPLAY_NUM" -silent | "$CONVERT" xwd:- "png:$OUT"
echo "reply finished: $(cat "$WORK/done1")"
# Close through the app (SIGTERM would skip the save on quit), then start it again on the
# saved state: the conversation must come back.
touch "$WORK/quit"
wait "$APP"
APP=""
rm -f "$WORK/quit"
ls "$WORK/state/conversation.session" "$WORK/state/transcript.json" >/dev/null
run_app "$WORK/done2"
wait_for "$WORK/done2" 60
status="$(cat "$WORK/done2")"
touch "$WORK/quit"
wait "$APP"
APP=""
case "$status" in
  Restored*) echo "second start: $status" ;;
  *) echo "the saved conversation was not restored: $status" >&2; exit 1 ;;
esac
echo "screenshot: $OUT"
