# Load per shard over time from portfleet-rebalance-bench --timeline FILE:
#   gnuplot -e "in='FILE'; out='rebalance_timeline.png'" tests/bench/rebalance_timeline.gp
set datafile separator ','
set terminal pngcairo size 900,420 font ',10'
set output out
set title 'Established connections per shard (kernel view): 2 shards, scale to 4, one-shot rebalance'
set xlabel 'ms since the first sample'
set ylabel 'connections held by the worker'
set key outside right
set grid
plot in using 1:2 with steps lw 2 title 'shard 0', \
     in using 1:3 with steps lw 2 title 'shard 1', \
     in using 1:4 with steps lw 2 title 'shard 2', \
     in using 1:5 with steps lw 2 title 'shard 3'
