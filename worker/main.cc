// portfleet-worker: see worker/worker.h and `portfleet-worker --help`.
#include "worker/worker.h"

int main(int argc, char** argv) { return portfleet::worker::Main(argc, argv); }
