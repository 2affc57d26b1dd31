# mk/daemon.mk: rules for dsparkd, common service code, systemd units and man pages.
