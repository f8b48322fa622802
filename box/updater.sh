#!/bin/sh
# box-config-daemon's updater/updater.sh, as the OPQ Box updater installs it: the "Update Box" button
# (POST /box_update) runs the verifying updater, opq-box-update, instead of downloading, installing and
# rebooting whatever happens. Through systemd where it runs (the same configuration, the same lock as the
# daily timer, the output in the journal), else directly with the same configuration file. The exit status
# is the updater's (through systemctl: 0 or not).
set -eu
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    exec sudo systemctl start opq-box-update.service
fi
exec sudo sh -c 'set -a
if [ -r /etc/default/opq-box-update ]; then . /etc/default/opq-box-update; fi
exec /usr/local/bin/opq-box-update'
