/* cmd-db.c: dsparkctl db init|migrate|status: the schema and its migrations. */
#include "config.h"

#include <getopt.h>
#include <string.h>

#include "ctl.h"

static void db_usage(FILE *f)
{
    fprintf(f,
            "usage: dsparkctl db init [--sql-dir DIR]\n"
            "       dsparkctl db migrate [--sql-dir DIR]\n"
            "       dsparkctl db status\n"
            "\n"
            "init     create the dspark schema (roles dspark_client, dspark_worker,\n"
            "         dspark_admin, tables, functions); refuses a database that has one\n"
            "migrate  apply the migrations the database lacks (each in one transaction;\n"
            "         safe to run concurrently and again)\n"
            "status   the database's schema version and this build's; exit 1 unless equal\n"
            "\n"
            "The migrations are built into dsparkctl; --sql-dir DIR reads NNN-name.sql\n"
            "files from DIR instead. init and migrate need a role that may create roles.\n"
            "  -d, --dsn DSN, --json, -q, --quiet, -h, --help\n");
}

static int db_status(struct ctl *c)
{
    int v;
    if (ds_db_schema_version(c->db, &v) < 0)
        return ctl_fail("could not read the schema version");
    size_t n;
    const struct ds_db_migration *m = ds_db_migrations(&n);
    if (c->json) {
        json_t *pending = json_array();
        for (size_t i = 0; i < n; i++)
            if (m[i].version > v)
                json_array_append_new(pending, json_string(m[i].name));
        json_t *j = json_pack("{s:i, s:i, s:b, s:o}", "database_version", v, "build_version",
                              DS_SCHEMA_VERSION, "current", v == DS_SCHEMA_VERSION, "pending",
                              pending);
        ctl_print_json(j, false);
        json_decref(j);
    } else {
        if (v == 0)
            printf("database schema: none (run 'dsparkctl db init')\n");
        else
            printf("database schema version: %d\n", v);
        printf("this build knows version: %d\n", DS_SCHEMA_VERSION);
        for (size_t i = 0; i < n; i++)
            if (m[i].version > v)
                printf("pending migration: %s\n", m[i].name);
        if (v > DS_SCHEMA_VERSION)
            printf("the database is newer than this build: upgrade dspark\n");
    }
    return v == DS_SCHEMA_VERSION ? CTL_EXIT_OK : CTL_EXIT_ERROR;
}

int ctl_cmd_db(struct ctl *c, int argc, char **argv)
{
    static const struct option opts[] = {
        CTL_COMMON_LONGOPTS,
        { "sql-dir", required_argument, NULL, 'S' },
        { NULL, 0, NULL, 0 },
    };
    const char *sqldir = NULL;
    int opt;
    while ((opt = getopt_long(argc, argv, CTL_COMMON_SHORTOPTS, opts, NULL)) != -1) {
        if (ctl_common_opt(c, opt, optarg))
            continue;
        switch (opt) {
        case 'h':
            db_usage(stdout);
            return CTL_EXIT_OK;
        case 'S':
            sqldir = optarg;
            break;
        default:
            db_usage(stderr);
            return CTL_EXIT_USAGE;
        }
    }
    if (optind + 1 != argc)
        return ctl_usage_error("db ", "expected one of init, migrate, status");
    const char *what = argv[optind];
    bool init = strcmp(what, "init") == 0;
    if (!init && strcmp(what, "migrate") != 0 && strcmp(what, "status") != 0)
        return ctl_usage_error("db ", "unknown db command '%s'", what);
    int rc = ctl_connect(c, false);
    if (rc)
        return rc;
    if (strcmp(what, "status") == 0)
        return db_status(c);

    int v;
    if (ds_db_schema_version(c->db, &v) < 0)
        return ctl_fail("could not read the schema version");
    if (init && v != 0) {
        ctl_error("the database already has a dspark schema (version %d)%s", v,
                  v < DS_SCHEMA_VERSION ? ": use 'dsparkctl db migrate'" : "");
        return CTL_EXIT_ERROR;
    }
    int from, to;
    if (ds_db_migrate(c->db, sqldir, &from, &to) < 0)
        return ctl_fail(init ? "could not create the schema" : "could not migrate the schema");
    if (c->json) {
        json_t *j = json_pack("{s:i, s:i}", "from_version", from, "to_version", to);
        ctl_print_json(j, true);
        json_decref(j);
    } else if (!c->quiet) {
        if (from == to)
            printf("schema version %d is current\n", to);
        else if (from == 0)
            printf("created schema version %d\n", to);
        else
            printf("migrated schema version %d to %d\n", from, to);
    }
    return CTL_EXIT_OK;
}
