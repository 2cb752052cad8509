# The two commands of the README, and a few more.
.PHONY: demo test bench db db-stop

demo:      ## run the local demo (private PostgreSQL, migrations, fleet, summary)
	scripts/demo.sh

test:      ## the whole test suite (what CI runs)
	scripts/test.sh

bench:     ## the benchmark (figures in docs/benchmark.md)
	scripts/bench.sh

db:        ## print a ready DATABASE_URL, starting the private cluster if needed
	@scripts/db.sh url

db-stop:   ## stop the private cluster
	scripts/db.sh stop
