# shellcheck shell=sh
# Installs the OPQ Box updater from an update. An update's install_update.sh sources this file once it has put
# box-config-daemon in place, from the update's top folder, where the updater's files lie in box-updater/:
#
#     . ./box-updater/install_update.snippet.sh
#
# It installs /usr/local/bin/opq-box-update, the systemd units (the timer enabled), /etc/opq/allowed_signers
# when the update ships one, and box-config-daemon's updater/updater.sh, so the "Update Box" button runs the
# updater too. Each file is written under a temporary name and renamed into place: the updater that may be
# running this very install keeps reading its own (old) script. Any failure exits install_update.sh with
# status 1, so the install counts as failed.
#
# OPQ_BOX_UPDATER_FILES: where the files are (./box-updater); OPQ_INSTALL_ROOT: a folder standing in for /
# (tests; systemctl is then not run).

opq_install_box_updater() (
    files=${OPQ_BOX_UPDATER_FILES:-./box-updater}
    root=${OPQ_INSTALL_ROOT:-}

    # put MODE SOURCE TARGET: a copy renamed into place (each step checked: a sourced file cannot rely on set -e)
    put() {
        mkdir -p "$root${3%/*}" && cp "$2" "$root$3.new" && chmod "$1" "$root$3.new" && mv -f "$root$3.new" "$root$3"
    }

    put 0755 "$files/opq-box-update" /usr/local/bin/opq-box-update || exit 1
    put 0644 "$files/opq-box-update.service" /etc/systemd/system/opq-box-update.service || exit 1
    put 0644 "$files/opq-box-update.timer" /etc/systemd/system/opq-box-update.timer || exit 1
    put 0755 "$files/updater.sh" /usr/local/box-config-daemon/updater/updater.sh || exit 1
    if [ -f "$files/allowed_signers" ]; then
        put 0644 "$files/allowed_signers" /etc/opq/allowed_signers || exit 1
    fi
    if [ -z "$root" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        systemctl daemon-reload || exit 1
        systemctl enable --now opq-box-update.timer || exit 1
    fi
    echo "opq-box-update: the OPQ Box updater is installed"
)

opq_install_box_updater || {
    echo "opq-box-update: error: installing the OPQ Box updater failed" >&2
    exit 1
}
